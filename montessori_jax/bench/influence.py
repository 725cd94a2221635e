"""``montessori bench influence``: the original procedure against ours, side by side.

(a) original: per probing example, restore the warm state from its checkpoint on disk, one
    training step on the example padded to 1024 tokens, a full pass over D_ref with every row
    padded to 1024 (as the original code does); influence = L_before - L_after.
(b) exact: examples batched with vmap in one compiled program, D_ref streamed at its real
    lengths (rows padded to multiples of 128).
(c) first-order: grad L_ref once, then -<g_ref, delta_z> per example.

All three run in JAX on the same model, data and warm state, so the comparison isolates the
procedure. Compile time is reported separately and excluded from the per-example times.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from montessori_jax.bench.common import build_model, cost_fields, machine_info, standin_example
from montessori_jax.config import OptimConfig
from montessori_jax.core import batching, optim, profiling, text
from montessori_jax.core import model as model_lib
from montessori_jax.core.checkpoint import Checkpoints
from montessori_jax.core.losses import batch_token_nll
from montessori_jax.errors import UserError
from montessori_jax.files import SHARED_DATA_ENV, shared_data_path
from montessori_jax.kernels import influence as influence_lib
from montessori_jax.kernels import influence_memory, train_step
from montessori_jax.stages import stats

ORIGINAL_LEN = 1024


def _seed_task_pairs(path: str, n: int, skip: int = 0) -> list[tuple[str, str]]:
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            inst = row["instances"][0]
            prompt = row["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else "")
            out.append((prompt, inst["output"]))
    return out[skip:skip + n]


def _ref_pairs(path: str, n: int) -> list[tuple[str, str]]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [(r["instruction"], r["response"]) for r in rows[:n]]


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def _original_procedure(graphdef, tx, state, ckpts, ref_ex, probes, ref_rows_per_chunk, pad):
    """(a) The original code's loop, per probe: reload the warm state from disk, one step on the
    probe, one pass over D_ref. Returns (compile seconds, reload, step and reference-pass
    seconds per probe, and each probe's influence)."""
    params = state["params"]
    like = state
    step_a = train_step.make_train_step(graphdef, tx)
    ref_rows = batching.rows_from_examples(ref_ex)
    ref_batches = [batching.pad_rows(ref_rows[i:i + ref_rows_per_chunk], ref_rows_per_chunk, ORIGINAL_LEN, pad)
                   for i in range(0, len(ref_rows), ref_rows_per_chunk)]

    def ref_pass_fn(params, b):
        logits = model_lib.apply(graphdef, params, b["tokens"], b["positions"], b["segment_ids"])
        return batch_token_nll(logits, b["tokens"], b["loss_mask"])

    ref_pass_jit = jax.jit(ref_pass_fn)

    def ref_pass(params):
        s = c = 0.0
        for b in ref_batches:
            bs, bc = ref_pass_jit(params, b)
            s, c = s + float(bs), c + float(bc)
        return s / c

    def one_example_batch(e):
        return batching.global_batch([batching.rows_from_examples([e])[0]], [0], 1, 1, (ORIGINAL_LEN,), pad)

    t0 = time.perf_counter()  # compile (a)'s two programs, outside the timings
    jax.block_until_ready(ref_pass_jit(params, ref_batches[0]))
    warm_copy = jax.tree.map(jnp.copy, state)
    jax.block_until_ready(step_a(warm_copy, one_example_batch(probes[0]))[0]["params"])
    compile_a = time.perf_counter() - t0
    before = ref_pass(params)
    reload_s, step_s, refpass_s, original = [], [], [], []
    for e in probes:
        t0 = time.perf_counter()
        restored, _ = ckpts.restore(like, step=1)
        jax.block_until_ready(restored)
        t1 = time.perf_counter()
        new, _ = step_a(restored, one_example_batch(e))
        jax.block_until_ready(new["params"])
        t2 = time.perf_counter()
        after = ref_pass(new["params"])
        t3 = time.perf_counter()
        reload_s.append(t1 - t0)
        step_s.append(t2 - t1)
        refpass_s.append(t3 - t2)
        original.append(before - after)
        del new, restored
    return compile_a, reload_s, step_s, refpass_s, original


def bench_influence(model: str = "smollm2", n_ref: int = 16, n_probe: int = 32, n_original: int = 3,
                    lr: float = 5e-6, batch_size: int | None = None, ref_rows_per_chunk: int = 4,
                    ref_path: str | None = None, probe_path: str | None = None, progress: bool = True,
                    random: str | None = None, dtype: str = "float32") -> dict:
    """``ref_path``, ``probe_path``: by default the shared data sets (``files.shared_data_path``).
    random: a ``RANDOM_PRESETS`` shape instead of ``model``, texts encoded by
    ``standin_example``; dtype: the matmuls' compute dtype (params and the update stay fp32).
    n_original=0 skips (a)."""
    say = print if progress else (lambda *a, **k: None)
    ref_path = ref_path or shared_data_path("reference_alpaca_eval_gpt4_1106.jsonl")
    probe_path = probe_path or shared_data_path("self_instruct_seed_tasks.jsonl")
    for path in (ref_path, probe_path):
        if not os.path.exists(path):
            raise UserError(f"{path}: no such file (bench influence reads the shared data sets; "
                            f"set {SHARED_DATA_ENV} to the folder that holds them)")
    m, name = build_model(model, random, "float32", dtype)
    cfg = m.cfg
    if random is None:
        tok = text.load_tokenizer(model)
        pad = text.pad_id(tok)

        def encode(p, r, max_len):
            return text.encode_example(tok, p, r, max_len=max_len)
    else:
        pad = 0

        def encode(p, r, max_len):
            return standin_example(p, r, cfg.vocab_size, max_len)
    graphdef, params = model_lib.split_params(m)
    del m

    probes = [encode(p, r, ORIGINAL_LEN) for p, r in _seed_task_pairs(probe_path, n_probe)]
    warm_ex = [encode(p, r, 256) for p, r in _seed_task_pairs(probe_path, 4, skip=n_probe)]
    ref_ex = [encode(p, r, ORIGINAL_LEN) for p, r in _ref_pairs(ref_path, n_ref)]
    ref = influence_lib.make_ref_set(ref_ex, ref_rows_per_chunk, pad)

    # the warm state: one warm-up step at the influence lr, saved to disk for (a); no gradient
    # clipping, as the original's one step (influence.grad_clip's default)
    ocfg = OptimConfig(lr=lr, warmup_ratio=1.0, stable_ratio=0.0, decay_ratio=0.0, grad_clip=None)
    tx = optim.adamw(ocfg, 1, learning_rate=lr)
    step_fn = train_step.make_train_step(graphdef, tx)
    rows = batching.rows_from_examples(warm_ex)
    state, _ = step_fn(train_step.init_state(params, tx), batching.global_batch(rows, [0, 1, 2, 3], 4, 4, (256,), pad))
    del params
    hp = influence_lib.AdamHP(lr=lr, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay,
                    grad_clip=ocfg.grad_clip)
    params = state["params"]
    mu, nu, count = optim.adam_moments(state["opt_state"])

    # (b) exact, vmapped
    probe_len = batching.bucket_length(max(len(e) for e in probes))
    ref_len = max(g["tokens"].shape[-1] for g in ref.groups)
    B, mem = (batch_size, None) if batch_size else influence_memory.choose_batch(
        cfg, len(probes), probe_len, ref_rows_per_chunk, ref_len, 0.5)
    say(f"(b) exact: {len(probes)} probes, B={B}, D_ref {ref.n_rows} rows / {ref.n_tokens} target tokens")
    batches = list(batching.batches(probes, B, pad_id=pad))
    t0 = time.perf_counter()
    base_fn = influence_lib.make_baseline(graphdef).lower(params, ref.groups).compile()
    compile_base = time.perf_counter() - t0
    (baseline, base_nll), t_base = _timed(base_fn, params, ref.groups)
    exact_fn = influence_lib.make_exact(graphdef, hp)
    t0 = time.perf_counter() - compile_base
    compiled, exact_flops = {}, {}
    for _, b in batches:
        shape = b["tokens"].shape
        if shape not in compiled:
            compiled[shape] = exact_fn.lower(params, mu, nu, count, b, ref.groups, base_nll, lr).compile()
            exact_flops[shape] = profiling.matmul_flops(exact_fn, params, mu, nu, count, b, ref.groups, base_nll, lr)
    compile_b = time.perf_counter() - t0
    exact = np.zeros(len(probes))
    t0 = time.perf_counter()
    for idx, b in batches:
        drop, _ = compiled[b["tokens"].shape](params, mu, nu, count, b, ref.groups, base_nll, lr)
        exact[idx] = np.asarray(drop)[: len(idx)]
        say(f"  {len(idx)} examples, {time.perf_counter() - t0:.1f} s so far")
    t_exact_examples = time.perf_counter() - t0
    t_exact = t_exact_examples + t_base
    exact_matmul_flops = sum(exact_flops[b["tokens"].shape] for _, b in batches)

    # (c) first order
    say("(c) first-order")
    plan = influence_memory.plan_ref_grad(cfg, ref_len, ref_rows_per_chunk, 0.5)
    grad_ref = influence_lib.make_ref_set(ref_ex, plan["rows_per_chunk"], pad)
    say(f"  grad L_ref: {plan['rows_per_chunk']} row(s) per chunk, remat {plan['remat']}")
    grad_fn = influence_lib.make_ref_grad(graphdef, plan["remat"])
    t0 = time.perf_counter()
    grad_c = grad_fn.lower(params, grad_ref.groups).compile()
    fo_fn = influence_lib.make_first_order(graphdef, hp)
    fo_compiled = {}
    for _, b in batches:
        if b["tokens"].shape not in fo_compiled:
            fo_compiled[b["tokens"].shape] = fo_fn.lower(params, mu, nu, count, b, jax.eval_shape(lambda: params),
                                                           lr).compile()
    compile_c = time.perf_counter() - t0
    (_, g_ref), t_gref = _timed(grad_c, params, grad_ref.groups)
    first = np.zeros(len(probes))
    t0 = time.perf_counter()
    for idx, b in batches:
        first[idx] = np.asarray(fo_compiled[b["tokens"].shape](params, mu, nu, count, b, g_ref, lr))[: len(idx)]
    t_fo_examples = time.perf_counter() - t0
    t_first = t_gref + t_fo_examples
    del g_ref

    # the exact program's FLOP/s and memory, before (a) adds its own
    costs = cost_fields(exact_matmul_flops / t_exact_examples)

    # (a) the original procedure
    compile_a, reload_s, step_s, refpass_s, original = None, [float("nan")], [float("nan")], [float("nan")], []
    if n_original > 0:
        say(f"(a) original: {n_original} examples")
        with tempfile.TemporaryDirectory(prefix="bench-influence-") as workdir:
            ckpts = Checkpoints(os.path.join(workdir, "warm"))
            try:
                ckpts.save(1, state, {"step": 1}, wait=True)
                compile_a, reload_s, step_s, refpass_s, original = _original_procedure(
                    graphdef, tx, state, ckpts, ref_ex, probes[:n_original], ref_rows_per_chunk, pad)
            finally:
                ckpts.close()
    per_a = float(np.mean(np.array(reload_s) + np.array(step_s) + np.array(refpass_s)))
    per_b = t_exact / len(probes)
    per_c = t_first / len(probes)
    agree = stats.agreement(exact, first)
    n_a = len(original)
    per_fo = t_fo_examples / len(probes)
    # (c) pays grad L_ref once per run, (b) the baseline pass once and a pass over D_ref per
    # example: c/b at P probes, from this run's measured parts
    per_b_marginal = (t_exact - t_base) / len(probes)
    growth = {str(p): (per_b_marginal + t_base / p) / (per_fo + t_gref / p) for p in (16, 32, 64, 256, 1024, 6000)}
    r = {
        "bench": "influence",
        "model": name,
        "dtype": dtype,
        "params_m": round(cfg.num_params() / 1e6, 1),
        "n_ref_rows": ref.n_rows,
        "n_ref_target_tokens": ref.n_tokens,
        "ref_real_tokens": int(sum(len(e) for e in ref_ex)),
        "n_probe": len(probes),
        "n_original": n_a,
        "lr": lr,
        "batch_size": B,
        "memory_estimate": mem,
        "s_per_example": {"original": per_a, "exact": per_b, "first_order": per_c},
        "ratio_original_over_exact": per_a / per_b,
        "ratio_exact_over_first_order": per_b / per_c,
        "original_breakdown_s": {"reload": float(np.mean(reload_s)), "step": float(np.mean(step_s)),
                                 "reference_pass": float(np.mean(refpass_s))},
        "exact_breakdown_s": {"baseline_once": t_base, "per_example": per_b_marginal},
        "first_order_breakdown_s": {"grad_ref_once": t_gref, "per_example": per_fo},
        "grad_ref_plan": plan,
        "ratio_exact_over_first_order_at_probes": growth,
        "compile_s": {"original": compile_a, "exact": compile_b, "first_order": compile_c},
        "agreement_exact_vs_first_order": agree,
        "original_vs_exact_max_abs_diff": (float(np.abs(np.array(original) - exact[:n_a]).max()) if n_a
                                           else float("nan")),
        "exact_matmul_flops_per_example": exact_matmul_flops / len(probes),
        **costs,
        "baseline_ref_loss": float(baseline),
        "influence": {"exact": exact.tolist(), "first_order": first.tolist(), "original": original},
        "machine": machine_info(),
    }
    if not n_a:  # (a) skipped: no numbers rather than NaN in the JSON
        r["s_per_example"]["original"] = r["ratio_original_over_exact"] = r["original_vs_exact_max_abs_diff"] = None
        r["original_breakdown_s"] = None
    return r


def format_table(r: dict) -> str:
    s = r["s_per_example"]
    a = r["agreement_exact_vs_first_order"]
    bd = r["original_breakdown_s"] or {k: float("nan") for k in ("reload", "step", "reference_pass")}
    nan = float("nan")
    return "\n".join([
        f"bench influence: {r['model']} ({r['params_m']}M), D_ref {r['n_ref_rows']} rows "
        f"({r['ref_real_tokens']} tokens), {r['n_probe']} probes (original: {r['n_original']}), lr {r['lr']:g}, B={r['batch_size']}",
        f"{'':14} {'s/example':>10}",
        f"{'(a) original':14} {s['original'] if s['original'] is not None else nan:10.2f}   reload {bd['reload']:.2f} + step {bd['step']:.2f} + reference pass {bd['reference_pass']:.2f}",
        f"{'(b) exact':14} {s['exact']:10.2f}",
        f"{'(c) first-ord':14} {s['first_order']:10.2f}   grad L_ref once {r['first_order_breakdown_s']['grad_ref_once']:.1f} s"
        f" + {r['first_order_breakdown_s']['per_example']:.2f} s per example",
        f"b/a speedup {r['ratio_original_over_exact'] or nan:.2f}x, c/b speedup {r['ratio_exact_over_first_order']:.2f}x",
        "c/b at P probes, from the measured parts: " + ", ".join(
            f"{p}: {v:.1f}x" for p, v in r.get("ratio_exact_over_first_order_at_probes", {}).items()),
        f"exact vs first-order: Spearman {a['spearman']:.3f}, sign agreement {a['sign_agreement']:.1%}; "
        f"original vs exact max |diff| {r['original_vs_exact_max_abs_diff'] or nan:.2e}",
    ] + ([f"(b) exact: {r['exact_matmul_flops_per_example']:.3g} matmul FLOPs per example, "
          f"{r['achieved_flops_per_s']:.3g} FLOP/s, MFU "
          + (f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown (no peak for this device)")
          + f"; peak memory {r['peak_memory_gb']:.2f} GiB ({r['peak_memory_measured']})"]
         if "achieved_flops_per_s" in r else []))
