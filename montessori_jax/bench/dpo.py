"""``montessori bench dpo``: the time of one DPO step with cached reference log-probs against a
live reference model, ours against a plain PyTorch loop (transformers' LlamaForCausalLM +
torch.optim.AdamW, the same sigmoid loss on the same concatenated chosen+rejected forward),
same weights, pairs and lengths, side by side in one process.

Every variant starts from the same weights, so its first step's loss is log 2 (policy =
reference); the losses after the timed steps are printed as a check that both sides train
alike.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from montessori_jax.bench.common import build_model, cost_fields, machine_info
from montessori_jax.config import DPOOptimConfig
from montessori_jax.core import model as model_lib
from montessori_jax.core import optim, profiling, text, weights
from montessori_jax.kernels import dpo as dpo_lib
from montessori_jax.kernels import train_step


def _pairs(n: int, length: int, vocab: int, seed: int = 0) -> list[dpo_lib.PairExample]:
    """Random pairs of full-length rows: a shared prompt (the first quarter), two answers."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(3, vocab, length // 4, dtype=np.int32)
        rows = []
        for _side in range(2):
            tokens = np.concatenate([prompt, rng.integers(3, vocab, length - len(prompt), dtype=np.int32)])
            mask = np.arange(length) >= len(prompt)
            rows.append(text.Example(tokens, mask))
        out.append(dpo_lib.PairExample(*rows))
    return out


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def bench_dpo(model: str = "smollm2", random: str | None = None, batch: int = 2, length: int = 256,
              steps: int = 3, warmup: int = 1, beta: float = 0.1, dtype: str = "float32",
              param_dtype: str = "float32", remat: bool = False, compare_torch: bool = True) -> dict:
    """dtype: the matmuls' compute dtype; param_dtype: params and AdamW moments.
    compare_torch=False: ours only. MFU: the cached step's matmul FLOPs (from its jaxpr) per
    second against the device's bf16 peak."""
    ours, name = build_model(model, random, param_dtype, dtype, remat)
    cfg = ours.cfg
    n = warmup + steps
    pairs = _pairs(n * batch, length, cfg.vocab_size)
    ocfg = DPOOptimConfig(warmup_ratio=0.0, stable_ratio=1.0, decay_ratio=0.0)
    graphdef, params = model_lib.split_params(ours)
    tx = optim.adamw(ocfg, n)

    # the reference log-probs, cached once (the stage's one pass), with the initial weights
    logps_fn = dpo_lib.make_logps_fn(graphdef)
    ref = np.zeros((2, len(pairs)), np.float32)
    t0 = time.perf_counter()
    for k in range(0, len(pairs), batch):
        idx = list(range(k, k + batch))
        lp = np.asarray(logps_fn(params, dpo_lib.make_batch(pairs, idx, batch, batch, 0)))
        ref[0, idx], ref[1, idx] = lp[:batch], lp[batch:]
    ref_pass_s = time.perf_counter() - t0
    batches = [dpo_lib.make_batch(pairs, list(range(s * batch, (s + 1) * batch)), batch, batch, 0, (ref[0], ref[1]))
               for s in range(n)]

    flops = {}

    def time_ours(live: bool):
        step = dpo_lib.make_train_step(graphdef, tx, beta, live_reference=live)
        state = train_step.init_state(_copy(params), tx)
        extra = (params,) if live else ()
        flops[live] = profiling.matmul_flops(step, state, batches[0], *extra)
        t0 = time.perf_counter()
        state, m = step(state, batches[0], *extra)
        first_loss = float(m["loss"])
        compile_s = time.perf_counter() - t0
        for b in batches[1:warmup]:
            state, m = step(state, b, *extra)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in batches[warmup:]:
            state, m = step(state, b, *extra)
        jax.block_until_ready(m)
        return (time.perf_counter() - t0) / steps, compile_s, first_loss, float(m["loss"])

    ours_cached = time_ours(False)
    ours_live = time_ours(True)
    rows = 2 * batch
    result = {
        "bench": "dpo",
        "model": name,
        "params_m": round(cfg.num_params() / 1e6, 2),
        "pairs_per_step": batch,
        "length": length,
        "rows_per_forward": rows,
        "steps_timed": steps,
        "beta": beta,
        "dtype": dtype,
        "param_dtype": param_dtype,
        "ours": {"cached_s_per_step": ours_cached[0], "live_s_per_step": ours_live[0],
                 "cached_compile_s": ours_cached[1], "live_compile_s": ours_live[1],
                 "first_loss": ours_cached[2], "last_loss_cached": ours_cached[3], "last_loss_live": ours_live[3],
                 "reference_pass_s_per_pair": ref_pass_s / len(pairs),
                 "tokens_per_s_cached": rows * length / ours_cached[0],
                 "matmul_flops_per_step": {"cached": flops[False], "live": flops[True]}},
        **cost_fields(flops[False] / ours_cached[0]),
        "live_over_cached": {"ours": ours_live[0] / ours_cached[0]},
        "log2": math.log(2),
        "machine": machine_info(),
    }
    if not compare_torch:
        return result
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        weights.save_hf(ours, os.path.join(tmp, "m"))
        del ours
        from transformers import AutoModelForCausalLM

        def load():
            return AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "m"), dtype=torch.float32)

        policy_init = {k: v.clone() for k, v in load().state_dict().items()}
        tm, tref = load().train(), load().eval()
    for p in tref.parameters():
        p.requires_grad_(False)

    def torch_logps(m, b):
        ids = torch.from_numpy(b["tokens"][0]).long()
        mask = torch.from_numpy(b["loss_mask"][0])[:, 1:].float()
        logits = m(input_ids=ids, attention_mask=torch.from_numpy(b["segment_ids"][0]).long()).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logp * mask).sum(-1)

    def time_torch(live: bool):
        tm.load_state_dict(policy_init)
        topt = torch.optim.AdamW(tm.parameters(), lr=ocfg.lr, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps,
                                 weight_decay=ocfg.weight_decay)

        def step(b):
            logps = torch_logps(tm, b)
            if live:
                with torch.no_grad():
                    r = torch_logps(tref, b)
            else:
                r = torch.from_numpy(b["ref_logps"][0])
            z = beta * ((logps[:batch] - r[:batch]) - (logps[batch:] - r[batch:]))
            loss = -torch.nn.functional.logsigmoid(z).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tm.parameters(), ocfg.grad_clip)
            topt.step()
            topt.zero_grad(set_to_none=True)
            return loss.item()

        first = step(batches[0])
        for b in batches[1:warmup]:
            step(b)
        t0 = time.perf_counter()
        for b in batches[warmup:]:
            last = step(b)
        return (time.perf_counter() - t0) / steps, first, last

    torch_cached = time_torch(False)
    torch_live = time_torch(True)
    result["torch"] = {"cached_s_per_step": torch_cached[0], "live_s_per_step": torch_live[0],
                       "first_loss": torch_cached[1], "last_loss_cached": torch_cached[2],
                       "last_loss_live": torch_live[2]}
    result["live_over_cached"]["torch"] = torch_live[0] / torch_cached[0]
    result["torch_over_ours"] = {"cached": torch_cached[0] / ours_cached[0], "live": torch_live[0] / ours_live[0]}
    return result


def format_table(r: dict) -> str:
    o, t = r["ours"], r.get("torch")
    lines = [
        f"bench dpo: {r['model']} ({r['params_m']}M params), {r['pairs_per_step']} pairs x {r['length']} tokens "
        f"per step ({r['rows_per_forward']} rows per forward), {r.get('dtype', 'float32')} compute, "
        f"{r.get('param_dtype', 'float32')} params, {r['steps_timed']} timed steps",
        f"{'s/step':10} {'cached ref':>11} {'live ref':>10} {'live/cached':>12}",
        f"{'ours':10} {o['cached_s_per_step']:11.4f} {o['live_s_per_step']:10.4f} {r['live_over_cached']['ours']:11.2f}x",
    ]
    if t is not None:
        lines += [
            f"{'pytorch':10} {t['cached_s_per_step']:11.4f} {t['live_s_per_step']:10.4f} "
            f"{r['live_over_cached']['torch']:11.2f}x",
            f"pytorch / ours time: cached {r['torch_over_ours']['cached']:.2f}x, live {r['torch_over_ours']['live']:.2f}x"
            f"   (ours compiled in {o['cached_compile_s']:.1f} s + {o['live_compile_s']:.1f} s)",
        ]
    line = (f"first-step loss (log 2 = {r['log2']:.6f}): ours {o['first_loss']:.6f}"
            + (f", pytorch {t['first_loss']:.6f}" if t else "")
            + f"; last: ours {o['last_loss_cached']:.6f} / {o['last_loss_live']:.6f}"
            + (f", pytorch {t['last_loss_cached']:.6f} / {t['last_loss_live']:.6f}" if t else "") + " (cached / live)")
    lines.append(line)
    if "achieved_flops_per_s" in r:
        mfu = r["mfu"]
        lines.append(f"ours cached: {r['achieved_flops_per_s']:.3g} matmul FLOP/s, MFU "
                     + (f"{mfu:.1%}" if mfu is not None else "unknown (no peak for this device)")
                     + f", peak memory {r['peak_memory_gb']:.2f} GiB ({r['peak_memory_measured']})")
    return "\n".join(lines)
