"""How much of the device the influence programs take: how many probing examples one exact
program runs at once, and whether grad L_ref fits without remat. Rough upper estimates from the
model's shape, calibrated on SmolLM2-135M on CPU."""

from __future__ import annotations

import os

import jax

from montessori_jax.core import model as model_lib


def device_memory_bytes() -> int:
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:  # CPU devices have no memory stats
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def per_example_bytes(cfg: model_lib.LlamaConfig, probe_len: int, ref_rows: int, ref_len: int) -> int:
    """A rough upper estimate of one vmapped example's working memory in the exact program:
    fp32 gradient, update and new params plus Adam temporaries (~5 copies of the params), the
    example's activations for its backward pass, and one reference chunk's forward."""
    n_params = cfg.num_params()
    d, f, v, L = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    # vocabulary-sized fp32 temporaries dominate: logits, log-softmax and its exp (forward);
    # plus their gradients for the example's backward pass
    act = probe_len * (L * (8 * d + 3 * f) + 5 * v) * 4
    ref = ref_rows * ref_len * (8 * d + 3 * f + 4 * v) * 4
    return 5 * n_params * 4 + act + ref


def ref_grad_bytes(cfg: model_lib.LlamaConfig, rows: int, ref_len: int, remat: bool) -> int:
    """A rough estimate of the reference gradient's working memory for one chunk of ``rows``
    rows of ``ref_len`` tokens: the gradient accumulator and one chunk's gradient (2 fp32
    copies of the params), vocabulary-sized fp32 temporaries, and the layers' activations kept
    for the backward pass (attention's [heads, T, T] temporaries dominate at long rows); with
    remat only the residual stream of each layer is kept, plus one layer's temporaries.

    Calibrated on SmolLM2-135M on CPU: 1 row of 1024 tokens without remat, XLA's temp
    allocation 7.8 GB against 8.1 GB estimated.
    """
    d, f, v, L, h = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers, cfg.n_heads
    tokens = rows * ref_len
    layer = (5 * h * ref_len + 10 * d + 4 * f) * 4  # bytes per token per layer, kept for backward
    kept = tokens * (L * d * 4 + layer) if remat else tokens * L * layer
    return 2 * cfg.num_params() * 4 + tokens * 5 * v * 4 + kept


def plan_ref_grad(cfg: model_lib.LlamaConfig, ref_len: int, rows_per_chunk: int, fraction: float) -> dict:
    """How to compute grad L_ref: the cheapest plan whose memory estimate fits in ``fraction``
    of the device. Without remat the backward pass is ~15% cheaper (SmolLM2 on CPU, 16
    reference rows: 108 s against 126 s), so it is preferred, first at the configured chunk
    size and then one row at a time; remat at the configured chunk size is the fallback."""
    budget = fraction * device_memory_bytes() - 3 * cfg.num_params() * 4  # params, mu, nu
    options = [(rows_per_chunk, False), (1, False), (rows_per_chunk, True)]
    for rows, remat in options:
        est = ref_grad_bytes(cfg, rows, ref_len, remat)
        if est <= budget:
            break
    return {"rows_per_chunk": rows, "remat": remat, "estimated_bytes": est, "budget_bytes": int(budget)}


def choose_batch(cfg, n_probe, probe_len, ref_rows, ref_len, fraction) -> tuple[int, dict]:
    total = device_memory_bytes()
    shared = 4 * cfg.num_params() * 4  # params, mu, nu, and the fp32 baseline copy
    per = per_example_bytes(cfg, probe_len, ref_rows, ref_len)
    avail = max(fraction * total - shared, per)
    b = max(1, min(int(avail // per), n_probe, 256))
    b = 1 << (b.bit_length() - 1)  # a power of two: few distinct programs across runs
    return b, {"device_bytes": total, "per_example_bytes": per, "shared_bytes": shared, "batch_size": b}
