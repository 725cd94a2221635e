"""``montessori influence --profile DIR``: what the influence programs cost in steady state.

For each program the estimator runs (exact, first-order), on the first chunk of probing
examples: XLA's cost analysis of the compiled program (FLOPs and bytes accessed; XLA counts
each loop body once), the matmul FLOPs counted from the jaxpr (scans times their length), one
call to warm up, then one call under ``jax.profiler.trace(DIR)``, timed: seconds per example,
achieved FLOP/s and, where the device's peak is known, MFU. Then each phase (example gradient,
AdamW update, reference pass) for one example as its own program, timed the same way. The
numbers go to the screen and to DIR/profile.json.
"""

from __future__ import annotations

import os
import time

import jax

from montessori_jax.core import profiling
from montessori_jax.files import write_json_atomic
from montessori_jax.kernels import influence as influence_lib


def _timed(fn, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def profile_influence(programs: dict, n_examples: int, phase_args: dict, profile_dir: str,
                      say=print) -> dict:
    """programs: name -> (jitted fn, args) of one chunk of ``n_examples`` examples (padded rows
    included: they cost the same). phase_args: graphdef, hp, param_dtype, params, mu, nu, count,
    ex (one example's row), groups, base_nll, lr: for the per-phase timings (None: skipped)."""
    kind = jax.devices()[0].device_kind
    out = {"device_kind": kind, "peak_bf16_flops": profiling.peak_flops(kind), "examples_per_call": n_examples,
           "programs": {}}
    compiled = {}
    for name, (fn, args) in programs.items():
        compiled[name] = fn.lower(*args).compile()
        jax.block_until_ready(compiled[name](*args))  # warm: first-call costs stay out of the trace
    for name, (fn, args) in programs.items():
        with jax.profiler.trace(os.path.join(profile_dir, name)):  # one trace (a TensorBoard run) per program
            _, seconds = _timed(compiled[name], *args)
            xla = profiling.xla_cost(compiled[name])
            mm = profiling.matmul_flops(fn, *args)
            rate = mm / seconds
            out["programs"][name] = {
                "seconds_per_call": seconds, "seconds_per_example": seconds / n_examples,
                "xla_flops_per_example": None if xla["flops"] is None else xla["flops"] / n_examples,
                "xla_bytes_accessed_per_example": (None if xla["bytes_accessed"] is None
                                                   else xla["bytes_accessed"] / n_examples),
                "matmul_flops_per_example": mm / n_examples, "achieved_flops_per_s": rate,
                "mfu": profiling.mfu(rate, kind)}
    # each program's costliest ops, from its trace's op events
    for name in programs:
        op_seconds = profiling.trace_op_seconds(os.path.join(profile_dir, name))
        if op_seconds:
            out["programs"][name]["top_ops"] = profiling.top_ops(compiled[name].as_text(), op_seconds)
    if phase_args is not None:
        out["phases_one_example"] = _phases(**phase_args)
    mem, what = profiling.peak_memory_bytes()
    out["peak_memory_bytes"], out["peak_memory_measured"] = mem, what
    os.makedirs(profile_dir, exist_ok=True)
    write_json_atomic(os.path.join(profile_dir, "profile.json"), out)
    for line in format_profile(out, profile_dir):
        say(line)
    return out


def _phases(graphdef, hp, param_dtype, params, mu, nu, count, ex, groups, base_nll, lr) -> dict:
    """Each phase of the exact kernel for one example, compiled apart, warmed, then timed."""
    progs = influence_lib.make_phase_programs(graphdef, hp, param_dtype)
    steps = [
        ("example_gradient", lambda: (params, ex)),
        ("adamw_update", lambda: (params, res["example_gradient"], mu, nu, count, lr)),
        ("reference_pass", lambda: (res["adamw_update"], groups, base_nll)),
    ]
    res, timings = {}, {}
    for name, make_args in steps:
        if name == "reference_pass" and groups is None:
            continue
        args = make_args()
        fn = progs[name].lower(*args).compile()
        jax.block_until_ready(fn(*args))
        res[name], seconds = _timed(fn, *args)
        timings[name] = {"seconds": seconds, "matmul_flops": profiling.matmul_flops(progs[name], *args)}
        if name == "adamw_update":
            res.pop("example_gradient")  # free the gradient before the reference pass
    return timings


def _e(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def format_profile(p: dict, profile_dir: str) -> list[str]:
    peak = p["peak_bf16_flops"]
    lines = [f"profile: {p['examples_per_call']} example(s) per call; {profiling.describe_peak(p['device_kind'])}"]
    for name, r in p["programs"].items():
        lines += [
            f"  {name}: XLA cost analysis per example: {_e(r['xla_flops_per_example'])} FLOPs, "
            f"{_e(r['xla_bytes_accessed_per_example'])} bytes accessed (each loop body counted once)",
            f"  {name}: matmul FLOPs per example (jaxpr, scans times their length): {_e(r['matmul_flops_per_example'])}",
            f"  {name}: steady state {r['seconds_per_call']:.3f} s per call, {r['seconds_per_example']:.3f} s per "
            f"example; achieved {_e(r['achieved_flops_per_s'])} FLOP/s; MFU "
            + (f"{r['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s" if r["mfu"] is not None else "unknown (no peak for this device)"),
        ]
    for name, r in p["programs"].items():
        if r.get("top_ops"):
            lines.append(f"  {name}: the ops that took the most time in its trace (summed over calls and threads):")
            lines += [f"    {o['seconds']:7.3f} s {o['share']:4.0%}  {o['op']:32} {o['shape'] or '?':28} {o['what'] or '?'}"
                      for o in r["top_ops"]]
    if "phases_one_example" in p:
        lines.append("  phases, one example each as its own program: " + ", ".join(
            f"{k} {v['seconds']:.3f} s ({_e(v['matmul_flops'])} matmul FLOPs)" for k, v in p["phases_one_example"].items()))
    lines.append(f"  peak memory {p['peak_memory_bytes'] / 2**30:.2f} GiB ({p['peak_memory_measured']}); "
                 f"trace and profile.json in {profile_dir}")
    return lines
