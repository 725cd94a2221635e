"""AdamW with a warmup-stable-decay schedule, as the original Montessori-Instruct configs use.

The optimizer is optax's AdamW wrapped in ``inject_hyperparams``, so the learning rate in use
is part of the optimizer state: the influence stage continues from a warm state with one more
step at a chosen lr without rebuilding anything.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from montessori_jax.config import OptimConfig


def wsd_factors(cfg: OptimConfig, total_steps: int) -> np.ndarray:
    """lr / peak for optimizer steps 0 .. total_steps, in float64; the last entry is for one
    step past the run. ``cfg.schedule`` says how (see ``OptimConfig``):

    montessori: warmup (step + 1) / W, so the first step already learns and step W-1 reaches
    the peak (a run that is all warmup, as the original warm-up stage, ends at the peak).
    Stable: 1. Decay over D steps down to min_lr_ratio at the last step.

    transformers: lambda(step) of transformers' ``get_wsd_schedule`` (4.44.2, the original's):
    W, S, D = int(ratio * T); warmup step / W from 0; stable 1; decay over D steps starting at
    1; min_lr_ratio from step W + S + D on.
    """
    T = max(int(total_steps), 1)
    i = np.arange(T + 1, dtype=np.float64)
    if cfg.schedule == "transformers":
        warmup, stable, decay = (int(r * T) for r in (cfg.warmup_ratio, cfg.stable_ratio, cfg.decay_ratio))
        warm = i / max(warmup, 1)
        stable_end, decay_end = warmup + stable, warmup + stable + decay
        progress = (i - stable_end) / max(decay, 1)
    else:
        warmup = int(round(cfg.warmup_ratio * T))
        decay = min(int(round(cfg.decay_ratio * T)), T - warmup)
        warm = (i + 1) / max(warmup, 1)
        stable_end, decay_end = T - decay, T + 1
        progress = np.clip((i - stable_end + 1) / max(decay, 1), 0.0, 1.0)
    if cfg.decay_shape == "cosine":
        down = 0.5 * (1 + np.cos(math.pi * progress))
    else:
        down = 1 - progress
    m = cfg.min_lr_ratio
    down = m + (1 - m) * down
    return np.where(i < warmup, warm, np.where(i < stable_end, 1.0, np.where(i < decay_end, down, m)))


def wsd_schedule(cfg: OptimConfig, total_steps: int):
    """lr(step) for step = 0 .. total_steps-1 (and past the end: the last entry of
    ``wsd_factors``): a float32 table computed in float64, so each lr is within one fp32
    rounding of the exact value."""
    table = np.asarray(cfg.lr * wsd_factors(cfg, total_steps), np.float32)

    def schedule(step):
        return jnp.asarray(table)[jnp.clip(jnp.asarray(step), 0, len(table) - 1)]

    return schedule


def continue_lr(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """The lr one more step continues at after ``step`` steps of the schedule (the influence
    step's default, recorded in warm_state.json). montessori: the lr of the last step taken
    (an all-warmup warm-up ends at the peak); transformers: the schedule's lr for the next
    step, which is what torch's LambdaLR leaves in the optimizer after the last step (and what
    the original's influence step, which loads that optimizer, uses)."""
    at = step if cfg.schedule == "transformers" else max(step - 1, 0)
    return float(wsd_schedule(cfg, total_steps)(at))


def decays(name: str) -> bool:
    """Weight decay skips the norm scales (``decay_norms`` puts them back): the one rule for the
    optimizer here and the influence kernel's explicit AdamW step."""
    return "norm" not in name


def _decay_mask(params: dict) -> dict:
    return {name: decays(name) for name in params}


def adamw(cfg: OptimConfig, total_steps: int, learning_rate=None) -> optax.GradientTransformation:
    """Gradient clipping (optional) then AdamW with the lr as an injected hyperparameter.

    ``learning_rate``: a constant or schedule in place of the WSD schedule (the influence stage
    passes the warm-up's last lr).
    """
    lr = wsd_schedule(cfg, total_steps) if learning_rate is None else learning_rate
    mask = None if cfg.decay_norms else _decay_mask

    def make(learning_rate):
        return optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask)

    tx = optax.inject_hyperparams(make)(learning_rate=lr)
    if cfg.grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return tx


def _inject_state(opt_state):
    """The injected-hyperparameters state inside a (possibly chained) optimizer state."""
    is_inject = lambda x: hasattr(x, "hyperparams") and hasattr(x, "inner_state")  # noqa: E731
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_inject):
        if is_inject(s):
            return s
    raise ValueError("no injected hyperparameters in this optimizer state")


def current_lr(opt_state) -> jax.Array:
    """The lr the last update used (from the injected hyperparameters)."""
    return _inject_state(opt_state).hyperparams["learning_rate"]


def adam_moments(opt_state):
    """(mu, nu, count) of the AdamW inside a (possibly chained) optimizer state."""
    is_adam = lambda x: hasattr(x, "mu") and hasattr(x, "nu") and hasattr(x, "count")  # noqa: E731
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam):
        if is_adam(s):
            return s.mu, s.nu, s.count
    raise ValueError("no Adam state in this optimizer state")
