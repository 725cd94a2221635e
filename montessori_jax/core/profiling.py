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


# ---------------------------------------------------------------------------------------------
# Where a compiled program's time goes, from a profiler trace


def trace_op_seconds(trace_dir: str) -> dict[str, float]:
    """{op name: seconds} summed over the complete events of the newest ``*.trace.json.gz``
    under ``trace_dir`` (XLA's ops: fusions, dots, copies; on CPU only with
    ``--xla_cpu_enable_xprof_traceme=true``, which ``montessori influence --profile`` sets).
    Only the events of HLO ops count (those naming an ``hlo_op``): not the Python frames, thunk
    executors, collectives' rendezvous and thread-pool waits around them."""
    import glob
    import gzip
    import json
    import os

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        return {}
    with gzip.open(files[-1]) as f:
        events = json.load(f).get("traceEvents", [])
    out: dict[str, float] = {}
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            out[op] = out.get(op, 0.0) + e.get("dur", 0) / 1e6
    return out


def top_ops(hlo_text: str, op_seconds: dict[str, float], n: int = 8) -> list[dict]:
    """The ``n`` ops of a compiled program that took the most time in its trace: name, seconds
    (summed over every call: a loop body's op runs once per layer and chunk), share of all the
    ops' time, and what the HLO says it is (result shape, opcode; for a fusion its kind and the
    opcode of its root, e.g. a dot)."""
    import re

    instr = {}
    roots = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if head and " = " not in line:
            current = head.group(1)
            continue
        m = re.match(r"\s*(ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(", line)
        if not m:
            continue
        if m.group(1) and current:
            roots[current] = m.group(4)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        kind = re.search(r"kind=(\w+)", line)
        instr[m.group(2)] = (m.group(3), m.group(4), kind.group(1) if kind else None, calls.group(1) if calls else None)
    # a loop's (or call's) event spans its body's ops, which have events of their own
    op_seconds = {k: v for k, v in op_seconds.items()
                  if instr.get(k, (None, None))[1] not in ("while", "call", "conditional")}
    total = sum(op_seconds.values()) or 1.0
    out = []
    for name, sec in sorted(op_seconds.items(), key=lambda kv: -kv[1])[:n]:
        shape, opcode, kind, calls = instr.get(name, (None, None, None, None))
        what = opcode if opcode != "fusion" else f"fusion ({kind}; root {roots.get(calls, '?')})"
        out.append({"op": name, "seconds": sec, "share": sec / total, "shape": shape, "what": what})
    return out
