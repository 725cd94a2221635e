"""How much of the device the compiled programs take: how many probing examples one exact
influence program runs at once, whether grad L_ref fits without remat, and the byte counts
behind them (activations of a backward pass, a forward pass) that ``montessori plan`` reuses
for every stage. Estimates from the model's shape, fitted to XLA's own buffer assignment
(``compiled.memory_analysis()``) of our programs on CPU across tiny shapes (vocabulary, width,
depth, heads, ffn and row length varied one at a time) and SmolLM2-135M, and checked against
measured peaks (docs/plan.md); the numbers are fp32 whatever the compute dtype, so they are
upper bounds in bf16.

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


def attention_keys(cfg: model_lib.LlamaConfig, seq_len: int) -> float:
    """Keys per query that ``model.causal_attention`` computes scores for, on average: its query
    blocks meet only the keys up to their own end, (T + block) / 2 of the T."""
    block = model_lib.ATTENTION_BLOCK
    return (seq_len + block) / 2 if seq_len > block else seq_len


def layer_bytes_per_token(cfg: model_lib.LlamaConfig, seq_len: int) -> int:
    """One layer's activations per token that a backward pass keeps: about 4 values per d_model
    and 5 per ffn unit, and 3 fp32 scores per head and key (attention's, which dominate at long
    rows)."""
    d, f, h = cfg.d_model, cfg.ffn_dim, cfg.n_heads
    return int((4 * d + 5 * f + 3 * h * attention_keys(cfg, seq_len)) * 4)


def remat_layer_bytes_per_token(cfg: model_lib.LlamaConfig, seq_len: int) -> int:
    """One layer's temporaries per token while a rematerialised backward pass recomputes and
    differentiates it: 2 values per d_model, 5 per ffn unit, 2.5 fp32 scores per head and key."""
    d, f, h = cfg.d_model, cfg.ffn_dim, cfg.n_heads
    return int((2 * d + 5 * f + 2.5 * h * attention_keys(cfg, seq_len)) * 4)


def forward_layer_bytes_per_token(cfg: model_lib.LlamaConfig, seq_len: int) -> int:
    """One layer's temporaries per token in a forward pass without gradient: a few activations
    and the attention scores (about 1.25 fp32 values per head and key)."""
    d, f, h = cfg.d_model, cfg.ffn_dim, cfg.n_heads
    return int(8 * (d + f) + 5 * h * attention_keys(cfg, seq_len))


def logits_bytes_per_token(cfg: model_lib.LlamaConfig, backward: bool = True) -> int:
    """Vocabulary-sized temporaries per token: the fp32 logits (NLL is their logsumexp minus the
    target's logit; nothing else of that size is kept), and in a backward pass about a quarter
    more (their gradient reuses the buffer)."""
    return (5 if backward else 4) * cfg.vocab_size


def activation_bytes(cfg: model_lib.LlamaConfig, rows: int, seq_len: int, remat: bool) -> int:
    """A backward pass's activations for ``rows`` rows of ``seq_len`` tokens: the logits'
    temporaries and the layers' activations kept for the backward; with remat only the residual
    stream of each layer is kept, plus one layer's temporaries."""
    tokens = rows * seq_len
    if remat:
        kept = tokens * (cfg.n_layers * cfg.d_model * 4 + remat_layer_bytes_per_token(cfg, seq_len))
    else:
        kept = tokens * cfg.n_layers * layer_bytes_per_token(cfg, seq_len)
    return tokens * logits_bytes_per_token(cfg) + kept


def forward_bytes(cfg: model_lib.LlamaConfig, rows: int, seq_len: int) -> int:
    """A forward pass (no gradient) over ``rows`` x ``seq_len`` tokens: the logits and one
    layer's temporaries at a time."""
    tokens = rows * seq_len
    return tokens * (logits_bytes_per_token(cfg, backward=False) + forward_layer_bytes_per_token(cfg, seq_len))


def per_example_bytes(cfg: model_lib.LlamaConfig, probe_len: int, ref_rows: int, ref_len: int,
                      params: int | None = None, fused_first_order: bool = True) -> int:
    """One vmapped example's working memory. Exact (``ref_rows`` > 0): its gradient and its
    updated params (2 fp32 copies of the params) and the larger of the example's backward
    activations and one reference chunk's forward, which XLA lays in the same buffers (the one
    phase is over before the other starts). First-order (``ref_rows`` 0), fused (the default:
    no gradient clipping): the example's backward activations, the gradient and the update of
    the parameters outside the layer stack and one layer's gradient and update (each layer's
    gradient is consumed in the backward pass: SmolLM2, 128 tokens: 391-445 MiB per example by
    XLA's account from B=1 to 4, 470 estimated); unfused (clipping): the whole gradient, the
    update and its AdamW temporaries (3 copies) and the activations."""
    n_params = cfg.num_params() if params is None else params
    act = activation_bytes(cfg, 1, probe_len, remat=False)
    if ref_rows == 0:
        if not fused_first_order:
            return 3 * n_params * 4 + act
        share = n_params / cfg.num_params()  # the caller's sharding divides every term alike
        layer = cfg.layer_params()
        outer = cfg.num_params() - cfg.n_layers * layer  # embedding, final norm, untied head
        return int(2 * (outer + layer) * share * 4) + act
    return 2 * n_params * 4 + max(act, forward_bytes(cfg, ref_rows, ref_len))


def ref_grad_bytes(cfg: model_lib.LlamaConfig, rows: int, ref_len: int, remat: bool,
                   params: int | None = None) -> int:
    """The reference gradient's working memory for one chunk of ``rows`` rows of ``ref_len``
    tokens: the gradient accumulator and one chunk's gradient (2 fp32 copies of the params) and
    the chunk's backward activations (``activation_bytes``).

    On SmolLM2-135M on CPU, 1 row of 1024 tokens without remat: XLA's temporaries and output
    3.9 GB (it accumulates each layer's gradient into the carry, no second copy), 4.7 GB
    estimated.
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
                 device_bytes: int | None = None, fused_first_order: bool = True) -> tuple[int, dict]:
    """B, the probing examples one program runs at once: as many as fit in ``fraction`` of the
    device by ``per_example_bytes``, a power of two. On a CPU backend (``device_bytes`` not
    given: the devices at hand) the exact estimator (``ref_rows`` > 0) takes one: there every
    example's reference pass runs with its own weights, the vmapped matmuls become batched
    matmuls, and XLA:CPU runs those slower than B separate plain ones (SmolLM2, 16 reference
    rows: 24.8 s per example at B=2 against 20.1 s at B=1). ``fused_first_order``: see
    ``per_example_bytes`` (false where the influence step clips its gradient)."""
    n_params = cfg.num_params() if params is None else params
    cpu_exact = device_bytes is None and ref_rows > 0 and jax.default_backend() == "cpu"
    total = device_memory_bytes() if device_bytes is None else device_bytes
    shared = 3 * n_params * 4  # params, mu, nu
    per = per_example_bytes(cfg, probe_len, ref_rows, ref_len, n_params, fused_first_order)
    avail = max(fraction * total - shared, per)
    b = max(1, min(int(avail // per), n_probe, 256))
    b = 1 if cpu_exact else 1 << (b.bit_length() - 1)  # a power of two: few distinct programs across runs
    return b, {"device_bytes": total, "per_example_bytes": per, "shared_bytes": shared, "batch_size": b}
