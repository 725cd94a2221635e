"""What a compiled program costs: XLA's cost analysis, matmul FLOPs counted from the jaxpr,
device peaks and MFU, peak memory.

XLA's ``cost_analysis()`` counts the body of a while loop once, whatever its trip count, so for
our programs (a ``lax.scan`` over layers and over D_ref's chunks) its FLOPs and bytes are
those of one iteration of each loop. ``matmul_flops`` walks the jaxpr instead and multiplies
each ``scan`` body by its length: the matmul FLOPs the program really does, the usual
numerator of MFU.
"""

from __future__ import annotations

import math
import resource

import jax
from jax.extend import core as jex_core

# Dense bf16 matmul peak in FLOP/s, by the start of jax's ``device_kind`` (longest match wins).
# Vendor figures without sparsity; on the H200 of this project a bf16 8192^3 matmul reached
# about 790 TFLOP/s (docs/benchmarks.md), 80% of its 989.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,
}


def peak_flops(device_kind: str | None = None) -> float | None:
    """The device's dense bf16 peak (FLOP/s), or None where it is not known (every CPU)."""
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if kind.startswith(key):
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_s: float, device_kind: str | None = None, n_devices: int = 1) -> float | None:
    """Achieved FLOP/s as a fraction of the devices' bf16 peak; None where the peak is unknown."""
    peak = peak_flops(device_kind)
    return None if peak is None else flops_per_s / (peak * n_devices)


def xla_cost(compiled) -> dict:
    """``{"flops", "bytes_accessed"}`` from XLA's cost analysis of a compiled program (each
    while-loop body counted once; see the module's note), None where XLA gives none."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {"flops": ca.get("flops"), "bytes_accessed": ca.get("bytes accessed")}


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _jaxpr_matmul_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
            continue
        subs = [s for v in eqn.params.values() for s in _sub_jaxprs(v)]
        if not subs:
            continue
        if name == "cond":  # one branch runs: the dearest
            total += max(_jaxpr_matmul_flops(s) for s in subs)
            continue
        inner = sum(_jaxpr_matmul_flops(s) for s in subs)
        if name == "scan":
            inner *= eqn.params["length"]
        total += inner  # while: trip count unknown, counted once (our programs use scan)
    return total


def matmul_flops(fn, *args) -> float:
    """FLOPs of every matmul ``fn(*args)`` does (2 x M x N x K each, scans times their length),
    from its jaxpr; nothing runs."""
    return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def peak_memory_bytes() -> tuple[int | None, str]:
    """(bytes, what was measured): the device allocator's peak where it reports one (GPU, TPU),
    else this process's peak resident set (CPU: params live in host memory)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss_kb) * 1024, "process peak RSS"


def describe_peak(device_kind: str | None = None) -> str:
    kind = device_kind if device_kind is not None else jax.devices()[0].device_kind
    peak = peak_flops(kind)
    if peak is None:
        return f"{kind}: peak unknown, no MFU"
    return f"{kind}: bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
