"""AdamW with a warmup-stable-decay schedule, as the original Montessori-Instruct configs use.

The optimizer is optax's AdamW wrapped in ``inject_hyperparams``, so the learning rate in use
is part of the optimizer state: the influence stage continues from a warm state with one more
step at a chosen lr without rebuilding anything.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from montessori_jax.config import OptimConfig


def wsd_schedule(cfg: OptimConfig, total_steps: int):
    """lr(step) for step = 0 .. total_steps-1.

    Warmup: lr * (step + 1) / W, so the first step already learns and step W-1 reaches the peak
    (a run that is all warmup, as the original warm-up stage, ends at the peak). Stable: lr.
    Decay over D steps down to lr * min_lr_ratio at the last step.
    """
    total_steps = max(int(total_steps), 1)
    warmup = int(round(cfg.warmup_ratio * total_steps))
    decay = int(round(cfg.decay_ratio * total_steps))
    decay = min(decay, total_steps - warmup)
    stable_end = total_steps - decay

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = (step + 1) / max(warmup, 1)
        progress = jnp.clip((step - stable_end + 1) / max(decay, 1), 0.0, 1.0)
        if cfg.decay_shape == "cosine":
            down = 0.5 * (1 + jnp.cos(math.pi * progress))
        else:
            down = 1 - progress
        down = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * down
        factor = jnp.where(step < warmup, warm, jnp.where(step < stable_end, 1.0, down))
        return cfg.lr * factor

    return schedule


def _decay_mask(params: dict) -> dict:
    return {name: "norm" not in name for name in params}


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
