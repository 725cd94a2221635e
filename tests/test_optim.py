"""The warmup-stable-decay schedule: `optim.schedule: transformers` step by step against
transformers' own get_wsd_schedule (a torch optimizer stepping its LambdaLR), and the lr an
influence step continues at."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import get_wsd_schedule

from montessori_jax.config import OptimConfig
from montessori_jax.core import optim

# (total steps, warmup, stable, decay ratios, min_lr_ratio): int(ratio * T) leaves steps over
# at 37 (3 + 18 + 14 = 35), an all-warmup warm-up as the original's, no warmup, no stable phase
CASES = [(10, 0.1, 0.5, 0.4, 1e-3), (37, 0.1, 0.5, 0.4, 1e-4), (100, 0.2, 0.3, 0.5, 0.05),
         (7, 1.0, 0.0, 0.0, 1.0), (23, 0.0, 0.6, 0.4, 0.1), (50, 0.3, 0.0, 0.7, 0.2)]


def _torch_lrs(lr, T, warmup, stable, decay, shape, min_lr_ratio):
    """The lr torch's AdamW uses at optimizer steps 0 .. T under get_wsd_schedule (as the
    Trainer runs it: scheduler.step() after each optimizer.step())."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = get_wsd_schedule(opt, num_warmup_steps=warmup, num_decay_steps=decay, num_stable_steps=stable,
                             decay_type=shape, min_lr_ratio=min_lr_ratio)
    out = []
    for _ in range(T + 1):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    return np.array(out)


def _optax_lrs(cfg, T):
    """The lr our AdamW (optax, lr injected) uses at each of its T steps, on a dummy param."""
    tx = optim.adamw(cfg, T)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    out = []
    for _ in range(T):
        _, state = tx.update({"w": jnp.ones(2)}, state, params)
        out.append(float(optim.current_lr(state)))
    return np.array(out)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-w{c[1]}-m{c[4]}" for c in CASES])
def test_transformers_schedule_is_get_wsd_schedule(case, shape):
    T, wr, sr, dr, m = case
    cfg = OptimConfig(lr=3e-4, warmup_ratio=wr, stable_ratio=sr, decay_ratio=dr, min_lr_ratio=m,
                      decay_shape=shape, schedule="transformers")
    W, S, D = int(wr * T), int(sr * T), int(dr * T)  # as the original computes them
    theirs = _torch_lrs(cfg.lr, T, W, S, D, shape, m)
    # transformers 4.44.2 (the original's) warms up from 0 whatever min_lr_ratio; the installed
    # version from min_lr_ratio, so its warmup steps come from a schedule with min_lr_ratio 0
    theirs[:W] = _torch_lrs(cfg.lr, T, W, S, D, shape, 0.0)[:W]
    if W:
        assert theirs[0] == 0.0
    ours = np.array([float(optim.wsd_schedule(cfg, T)(i)) for i in range(T + 1)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-7, atol=0)
    np.testing.assert_allclose(_optax_lrs(cfg, T), theirs[:T], rtol=1e-7, atol=0)
    # one step past the run: what the original's influence step continues at
    assert optim.continue_lr(cfg, T, T) == pytest.approx(theirs[T], rel=1e-7)
    assert theirs[T] == pytest.approx(cfg.lr * m, rel=1e-12)


def test_original_warmup_continues_at_the_peak():
    """The original's warm-up (all warmup, min_lr_ratio 1.0): its steps run at 0, 1/W, ...,
    (W-1)/W of the peak and the influence step at the peak; ours (montessori) runs 1/W .. 1 and
    continues at the peak too."""
    ramp = dict(lr=5e-6, warmup_ratio=1.0, stable_ratio=0.0, decay_ratio=0.0, min_lr_ratio=1.0)
    hf = OptimConfig(**ramp, schedule="transformers")
    ours = OptimConfig(**ramp)
    np.testing.assert_allclose([float(optim.wsd_schedule(hf, 4)(i)) for i in range(4)],
                               [0.0, 1.25e-6, 2.5e-6, 3.75e-6], rtol=1e-7)
    np.testing.assert_allclose([float(optim.wsd_schedule(ours, 4)(i)) for i in range(4)],
                               [1.25e-6, 2.5e-6, 3.75e-6, 5e-6], rtol=1e-7)
    assert optim.continue_lr(hf, 4, 4) == pytest.approx(5e-6, rel=1e-7)
    assert optim.continue_lr(ours, 4, 4) == pytest.approx(5e-6, rel=1e-7)
    # with the default min_lr_ratio 0 the transformers schedule leaves nothing to step with
    assert optim.continue_lr(dataclasses.replace(hf, min_lr_ratio=0.0), 4, 4) == 0.0
    assert optim.continue_lr(dataclasses.replace(ours, min_lr_ratio=0.0), 4, 4) == pytest.approx(5e-6, rel=1e-7)


def test_montessori_cosine_decay():
    """Our default counting with a cosine decay: half a cosine from the peak, lr * min_lr_ratio
    at the last step."""
    cfg = OptimConfig(lr=1.0, warmup_ratio=0.2, stable_ratio=0.4, decay_ratio=0.4, min_lr_ratio=0.1,
                      decay_shape="cosine")
    lrs = [float(optim.wsd_schedule(cfg, 10)(i)) for i in range(10)]
    down = [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in (1, 2, 3, 4)]
    np.testing.assert_allclose(lrs, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, *down], rtol=1e-7)
