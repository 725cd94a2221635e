"""How much of the device the compiled programs take: how many probing examples one exact
influence program runs at once, whether grad L_ref fits without remat, and the byte counts
behind them (activations of a backward pass, a forward pass) that ``montessori plan`` reuses
for every stage. Rough upper estimates from the model's shape, calibrated on SmolLM2-135M on
CPU; the numbers are fp32 whatever the compute dtype, so they are upper bounds in bf16.

``params`` below is the number of parameters one device holds (the whole model unless the
caller divides it by its sharding); ``device_bytes`` the memory of one device (default: the
first local device's)."""

from __future__ import annotations

import os

import jax

from montessori_jax.core import distributed
from montessori_jax.core import model as model_lib


def device_memory_bytes() -> int:
    """One local device's memory: its allocator's limit; for CPU devices (no memory stats) the
    host's RAM divided among every device that shares it, this process's devices times the
    processes of the job on this host (``distributed.processes_on_this_host``)."""
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
    except Exception:  # CPU devices have no memory stats
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // (jax.local_device_count() * distributed.processes_on_this_host()))


def layer_bytes_per_token(cfg: model_lib.LlamaConfig, seq_len: int) -> int:
    """One layer's activations per token that a backward pass keeps (attention's [heads, T, T]
    fp32 temporaries dominate at long rows)."""
    d, f, h = cfg.d_model, cfg.ffn_dim, cfg.n_heads
    return (5 * h * seq_len + 10 * d + 4 * f) * 4


def logits_bytes_per_token(cfg: model_lib.LlamaConfig, copies: int = 5) -> int:
    """Vocabulary-sized fp32 temporaries per token: logits, log-softmax and its exp (3, a
    forward), plus their gradients (5, a backward)."""
    return copies * cfg.vocab_size * 4


def activation_bytes(cfg: model_lib.LlamaConfig, rows: int, seq_len: int, remat: bool) -> int:
    """A backward pass's activations for ``rows`` rows of ``seq_len`` tokens: the logits'
    temporaries and the layers' activations kept for the backward; with remat only the residual
    stream of each layer is kept, plus one layer's temporaries."""
    tokens = rows * seq_len
    layer = layer_bytes_per_token(cfg, seq_len)
    kept = tokens * (cfg.n_layers * cfg.d_model * 4 + layer) if remat else tokens * cfg.n_layers * layer
    return tokens * logits_bytes_per_token(cfg) + kept


def forward_bytes(cfg: model_lib.LlamaConfig, rows: int, seq_len: int) -> int:
    """A forward pass (no gradient) over ``rows`` x ``seq_len`` tokens: the logits'
    temporaries and one layer's at a time."""
    tokens = rows * seq_len
    return tokens * (logits_bytes_per_token(cfg, 3) + layer_bytes_per_token(cfg, seq_len))


def per_example_bytes(cfg: model_lib.LlamaConfig, probe_len: int, ref_rows: int, ref_len: int,
                      params: int | None = None) -> int:
    """A rough upper estimate of one vmapped example's working memory in the exact program:
    fp32 gradient, update and new params plus Adam temporaries (~5 copies of the params), the
    example's activations for its backward pass, and one reference chunk's forward
    (``ref_rows`` 0: none, the first-order program)."""
    n_params = cfg.num_params() if params is None else params
    d, f, v, L = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    # vocabulary-sized fp32 temporaries dominate: logits, log-softmax and its exp (forward);
    # plus their gradients for the example's backward pass
    act = probe_len * (L * (8 * d + 3 * f) + 5 * v) * 4
    ref = ref_rows * ref_len * (8 * d + 3 * f + 4 * v) * 4
    return 5 * n_params * 4 + act + ref


def ref_grad_bytes(cfg: model_lib.LlamaConfig, rows: int, ref_len: int, remat: bool,
                   params: int | None = None) -> int:
    """A rough estimate of the reference gradient's working memory for one chunk of ``rows``
    rows of ``ref_len`` tokens: the gradient accumulator and one chunk's gradient (2 fp32
    copies of the params) and the chunk's backward activations (``activation_bytes``).

    Calibrated on SmolLM2-135M on CPU: 1 row of 1024 tokens without remat, XLA's temp
    allocation 7.8 GB against 8.1 GB estimated.
    """
    n_params = cfg.num_params() if params is None else params
    return 2 * n_params * 4 + activation_bytes(cfg, rows, ref_len, remat)


def plan_ref_grad(cfg: model_lib.LlamaConfig, ref_len: int, rows_per_chunk: int, fraction: float,
                  params: int | None = None, device_bytes: int | None = None) -> dict:
    """How to compute grad L_ref: the cheapest plan whose memory estimate fits in ``fraction``
    of the device. Without remat the backward pass is ~15% cheaper (SmolLM2 on CPU, 16
    reference rows: 108 s against 126 s), so it is preferred, first at the configured chunk
    size and then one row at a time; remat at the configured chunk size is the fallback."""
    n_params = cfg.num_params() if params is None else params
    total = device_memory_bytes() if device_bytes is None else device_bytes
    budget = fraction * total - 3 * n_params * 4  # params, mu, nu
    options = [(rows_per_chunk, False), (1, False), (rows_per_chunk, True)]
    for rows, remat in options:
        est = ref_grad_bytes(cfg, rows, ref_len, remat, n_params)
        if est <= budget:
            break
    return {"rows_per_chunk": rows, "remat": remat, "estimated_bytes": est, "budget_bytes": int(budget)}


def choose_batch(cfg, n_probe, probe_len, ref_rows, ref_len, fraction, params: int | None = None,
                 device_bytes: int | None = None) -> tuple[int, dict]:
    """B, the probing examples one program runs at once: as many as fit in ``fraction`` of the
    device by ``per_example_bytes``, a power of two. On a CPU backend (``device_bytes`` not
    given: the devices at hand) the exact estimator (``ref_rows`` > 0) takes one: there every
    example's reference pass runs with its own weights, the vmapped matmuls become batched
    matmuls, and XLA:CPU runs those slower than B separate plain ones (SmolLM2, 16 reference
    rows: 24.8 s per example at B=2 against 20.1 s at B=1)."""
    n_params = cfg.num_params() if params is None else params
    cpu_exact = device_bytes is None and ref_rows > 0 and jax.default_backend() == "cpu"
    total = device_memory_bytes() if device_bytes is None else device_bytes
    shared = 4 * n_params * 4  # params, mu, nu, and the fp32 baseline copy
    per = per_example_bytes(cfg, probe_len, ref_rows, ref_len, n_params)
    avail = max(fraction * total - shared, per)
    b = max(1, min(int(avail // per), n_probe, 256))
    b = 1 if cpu_exact else 1 << (b.bit_length() - 1)  # a power of two: few distinct programs across runs
    return b, {"device_bytes": total, "per_example_bytes": per, "shared_bytes": shared, "batch_size": b}
