"""``montessori plan`` against measured memory on this machine (docs/plan.md).

    python -m montessori_jax.bench.plan_check CASE [--json FILE]     one case, in its own process
    python -m montessori_jax.bench.plan_check all --json FILE        every case, one process each

A case runs one stage's compiled program on a random-weight model of the named shape, twice:
the first call compiles, the second is measured. Measured = the bytes of the arrays the call
takes (params, optimizer state, inputs: counted exactly) plus how far the process's resident
memory rises above its level just before the call (the kernel's peak counter reset there,
after returning freed memory to the OS): the program's temporaries and outputs. The runtime's
own constant footprint (compiled code, thread pools, the interpreter) is left out, as the plan
leaves it out. Large allocations are taken from the OS directly (glibc's mmap threshold fixed
at 64 KiB), so memory freed by the first call is not silently reused by the second. XLA's own
account of the program (arguments + outputs + temporaries - aliased) is reported beside it.
The plan's number is ``montessori plan``'s total for the same config.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

# case -> (shape, stage row of the plan, config overrides)
CASES = {
    "tiny-sft": ("tiny", "warmup", ["warmup.batch_size=8", "warmup.max_len=512", "student.remat=false"]),
    "tiny-sft-remat": ("tiny", "warmup", ["warmup.batch_size=8", "warmup.max_len=512", "student.remat=true"]),
    "tiny-exact": ("tiny", "influence", ["influence.estimator=exact", "influence.batch_size=4", "influence.max_len=512",
                                         "influence.ref_max_len=512", "influence.ref_batch_size=4"]),
    "tiny-first-order": ("tiny", "influence", ["influence.estimator=first_order", "influence.batch_size=4",
                                               "influence.max_len=512", "influence.ref_max_len=512",
                                               "influence.ref_batch_size=4"]),
    "tiny-sample": ("tiny", "synthesis", ["synthesis.batch_size=256", "synthesis.samples_per_prompt=4",
                                          "synthesis.instruction_sampling.max_new_tokens=256",
                                          "synthesis.response_sampling.max_new_tokens=256"]),
    "smollm2-sft": ("smollm2-135m", "warmup", ["warmup.batch_size=1", "warmup.max_len=128", "student.remat=true"]),
    "smollm2-exact": ("smollm2-135m", "influence", ["influence.estimator=exact", "influence.batch_size=1",
                                                    "influence.max_len=64", "influence.ref_max_len=128",
                                                    "influence.ref_batch_size=1"]),
    "smollm2-first-order": ("smollm2-135m", "influence", ["influence.estimator=first_order", "influence.batch_size=1",
                                                          "influence.max_len=64", "influence.ref_max_len=128",
                                                          "influence.ref_batch_size=1"]),
    "smollm2-sample": ("smollm2-135m", "synthesis", ["synthesis.batch_size=8", "synthesis.samples_per_prompt=4",
                                                     "synthesis.instruction_sampling.max_new_tokens=64",
                                                     "synthesis.response_sampling.max_new_tokens=64"]),
}
PROMPT_LEN = 64


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _fix_mmap_threshold() -> None:
    """Every allocation over 64 KiB its own mapping, returned to the OS when freed (glibc
    otherwise raises the threshold after the first large free and keeps later ones in its heap)."""
    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def _nbytes(*trees) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(trees) if hasattr(x, "nbytes")))


def _reset_peak() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _xla_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:
        return None


def run_case(name: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from montessori_jax.config import Config, load_config
    from montessori_jax.core import batching, optim, text
    from montessori_jax.core import model as model_lib
    from montessori_jax.kernels import influence as influence_lib
    from montessori_jax.kernels import train_step
    from montessori_jax.kernels.sampler import Sampler, SamplingParams
    from montessori_jax.stages import plan as plan_lib

    shape, stage, overrides = CASES[name]
    cfg = load_config(Config, None, overrides)
    role = "teacher" if stage == "synthesis" else "student"
    mcfg = getattr(cfg, role)
    planned = plan_lib.plan(cfg, 1, 64 * 2**30, {"teacher": shape, "student": shape}, PROMPT_LEN)
    row = next(p for p in planned["stages"] if p["stage"] == stage)
    _fix_mmap_threshold()
    jax.numpy.zeros(1).block_until_ready()

    lcfg = model_lib.LlamaConfig(**model_lib.SHAPES[shape], param_dtype=mcfg.param_dtype, dtype=mcfg.dtype,
                                 remat=mcfg.remat)
    rng = np.random.default_rng(0)

    def tokens(n):
        return rng.integers(3, lcfg.vocab_size, n).astype(np.int32)

    def example(n):
        return text.Example(tokens(n), np.r_[np.zeros(n // 2, bool), np.ones(n - n // 2, bool)])

    model = model_lib.create(lcfg)
    xla = None
    if stage == "warmup":
        sec = cfg.warmup
        graphdef, params = model_lib.split_params(model)
        del model
        tx = optim.adamw(sec.optim, 10)
        state = train_step.init_state(params, tx)
        del params
        step = train_step.make_train_step(graphdef, tx)
        M, T = sec.micro_batch_size or sec.batch_size, sec.max_len
        _, batch = next(batching.batches([example(T) for _ in range(M)], M))
        batch = {k: v[None] for k, v in batch.items()}
        xla = _xla_bytes(step.lower(state, batch).compile())
        state, m = step(state, batch)
        jax.block_until_ready(m)
        del m
        args = _nbytes(state, batch)
        _reset_peak()
        base = _rss()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
    elif stage == "influence":
        icfg = cfg.influence
        graphdef, params = model_lib.split_params(model)
        del model
        mu = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
        nu = jax.tree.map(lambda x: jnp.full_like(x, 1e-6), params)
        count = jnp.int32(10)
        hp = influence_lib.AdamHP(lr=5e-6)
        ref = influence_lib.make_ref_set([example(icfg.ref_max_len) for _ in range(2 * icfg.ref_batch_size)],
                                         icfg.ref_batch_size, 0)
        _, batch = next(batching.batches([example(icfg.max_len) for _ in range(icfg.batch_size)], icfg.batch_size))
        if icfg.estimator == "exact":
            _, base_nll = influence_lib.make_baseline(graphdef)(params, ref.groups)
            fn = influence_lib.make_exact(graphdef, hp)
            call = (params, mu, nu, count, batch, ref.groups, base_nll, hp.lr)
            xla = _xla_bytes(fn.lower(*call).compile())
            jax.block_until_ready(fn(*call))
            args = _nbytes(call)
            _reset_peak()
            base = _rss()
            jax.block_until_ready(fn(*call))
        else:
            plan = row["other"]
            grad_ref = influence_lib.make_ref_set(
                [example(icfg.ref_max_len) for _ in range(2 * icfg.ref_batch_size)], plan["ref_grad_rows"], 0)
            gfn = influence_lib.make_ref_grad(graphdef, bool(plan["ref_grad_remat"]))
            fo = influence_lib.make_first_order(graphdef, hp)
            g = gfn(params, grad_ref.groups)[1]
            out = fo(params, mu, nu, count, batch, g, hp.lr)
            xla = max(_xla_bytes(gfn.lower(params, grad_ref.groups).compile()) or 0,
                      _xla_bytes(fo.lower(params, mu, nu, count, batch, g, hp.lr).compile()) or 0)
            jax.block_until_ready(out)
            del g, out
            args = _nbytes(params, mu, nu, count, batch, grad_ref.groups)
            _reset_peak()
            base = _rss()
            g = gfn(params, grad_ref.groups)[1]
            jax.block_until_ready(fo(params, mu, nu, count, batch, g, hp.lr))
    else:
        syn = cfg.synthesis
        sampler = Sampler(model, pad_id=0)
        del model
        n = syn.samples_per_prompt
        prompts = [list(tokens(PROMPT_LEN)) for _ in range(syn.batch_size // n)]
        sp = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=syn.instruction_sampling.max_new_tokens, n=n)
        sampler.generate(prompts, sp, stop_ids=(), batch_size=syn.batch_size)
        args = _nbytes(sampler.params)
        _reset_peak()
        base = _rss()
        sampler.generate(prompts, sp, stop_ids=(), batch_size=syn.batch_size)
    peak = _rss("VmHWM")
    return {"case": name, "shape": shape, "stage": stage, "overrides": overrides,
            "measured_bytes": args + peak - base, "argument_bytes": args, "rss_before_call": base, "xla_bytes": xla, "plan_bytes": row["total"],
            "plan_row": row}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m montessori_jax.bench.plan_check")
    ap.add_argument("case", choices=[*CASES, "all"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.case == "all":
        results = []
        for name in CASES:
            out = subprocess.run([sys.executable, "-m", "montessori_jax.bench.plan_check", name],
                                 capture_output=True, text=True, env=os.environ)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(format_row(results[-1]), flush=True)
    else:
        results = [run_case(args.case)]
        print(json.dumps(results[0]))
    if args.json:
        from montessori_jax.files import write_json_atomic

        write_json_atomic(args.json, results)
    return 0


def format_row(r: dict) -> str:
    mib = 2**20
    xla = f"{r['xla_bytes'] / mib:8.0f}" if r["xla_bytes"] else f"{'-':>8}"
    return (f"{r['case']:22} measured {r['measured_bytes'] / mib:8.0f} MiB  XLA {xla} MiB  plan "
            f"{r['plan_bytes'] / mib:8.0f} MiB  plan/measured {r['plan_bytes'] / r['measured_bytes']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
