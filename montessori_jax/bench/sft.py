"""``montessori bench sft``: training tokens/s of our jitted SFT step against a plain PyTorch
loop (transformers' LlamaForCausalLM + torch.optim.AdamW), same model, batches and lengths,
side by side in one process."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np

from montessori_jax.bench.common import build_model, cost_fields, machine_info
from montessori_jax.config import OptimConfig
from montessori_jax.core import model as model_lib
from montessori_jax.core import optim, profiling, weights
from montessori_jax.kernels import train_step


def _batches(n: int, batch: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Full-length rows; the second half of each row is the response (the loss mask)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(3, vocab, (1, batch, length), dtype=np.int32)
        mask = np.zeros((1, batch, length), bool)
        mask[..., length // 2:] = True
        seg = np.ones((1, batch, length), np.int32)
        pos = np.broadcast_to(np.arange(length, dtype=np.int32), (1, batch, length)).copy()
        out.append({"tokens": tokens, "positions": pos, "segment_ids": seg, "loss_mask": mask})
    return out


def bench_sft(model: str = "smollm2", batch: int = 4, length: int = 256, steps: int = 5,
              warmup: int = 2, dtype: str = "float32", progress: bool = True, random: str | None = None,
              param_dtype: str = "float32", remat: bool = False, compare_torch: bool = True) -> dict:
    """dtype: the matmuls' compute dtype; param_dtype: params and AdamW moments. random: a
    ``RANDOM_PRESETS`` shape instead of ``model``. compare_torch=False: ours only. MFU counts the
    step's matmul FLOPs (forward and backward, from its jaxpr) against the device's bf16 peak."""
    ours, name = build_model(model, random, param_dtype, dtype, remat)
    cfg = ours.cfg
    data = _batches(warmup + steps, batch, length, cfg.vocab_size)
    ocfg = OptimConfig(lr=5e-6, warmup_ratio=0.0, stable_ratio=1.0, decay_ratio=0.0)
    tokens_per_step = batch * length

    # ours
    graphdef, params = model_lib.split_params(ours)
    with tempfile.TemporaryDirectory() as tmp:
        if compare_torch:
            weights.save_hf(ours, os.path.join(tmp, "m"))
        del ours
        tx = optim.adamw(ocfg, warmup + steps)
        step = train_step.make_train_step(graphdef, tx)
        state = train_step.init_state(params, tx)
        del params
        flops_per_step = profiling.matmul_flops(step, state, data[0])
        t0 = time.perf_counter()
        state, m = step(state, data[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for b in data[1:warmup]:
            state, m = step(state, b)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for b in data[warmup:]:
            state, m = step(state, b)
        jax.block_until_ready(m)
        ours_s = (time.perf_counter() - t0) / steps
        ours_loss = float(m["loss"])
        del state
        costs = cost_fields(flops_per_step / ours_s)
        result = {
            "bench": "sft",
            "model": name,
            "params_m": round(cfg.num_params() / 1e6, 1),
            "batch": batch,
            "length": length,
            "steps_timed": steps,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "remat": remat,
            "ours_s_per_step": ours_s,
            "ours_tokens_per_s": tokens_per_step / ours_s,
            "ours_compile_s": compile_s,
            "matmul_flops_per_step": flops_per_step,
            **costs,
            "last_loss": {"ours": ours_loss},
            "machine": machine_info(),
        }
        if not compare_torch:
            return result
        # a plain PyTorch loop on the same weights and batches
        import torch
        from transformers import AutoModelForCausalLM

        tm = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "m"), dtype=torch.float32).train()
    topt = torch.optim.AdamW(tm.parameters(), lr=ocfg.lr, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps,
                             weight_decay=ocfg.weight_decay)

    def torch_step(b):
        ids = torch.from_numpy(b["tokens"][0]).long()
        labels = torch.where(torch.from_numpy(b["loss_mask"][0]), ids, -100)
        loss = tm(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), ocfg.grad_clip)
        topt.step()
        topt.zero_grad(set_to_none=True)
        return loss.item()

    for b in data[:warmup]:
        torch_step(b)
    t0 = time.perf_counter()
    for b in data[warmup:]:
        torch_loss = torch_step(b)
    torch_s = (time.perf_counter() - t0) / steps

    result.update(torch_s_per_step=torch_s, torch_tokens_per_s=tokens_per_step / torch_s, ratio=torch_s / ours_s)
    result["last_loss"]["torch"] = torch_loss
    return result


def format_table(r: dict) -> str:
    mfu = r.get("mfu")
    lines = [
        f"bench sft: {r['model']} ({r['params_m']}M params), batch {r['batch']} x {r['length']} tokens, "
        f"{r['dtype']} compute, {r.get('param_dtype', 'float32')} params, {r['steps_timed']} timed steps",
        f"{'':10} {'s/step':>9} {'tokens/s':>10}",
        f"{'ours':10} {r['ours_s_per_step']:9.3f} {r['ours_tokens_per_s']:10.0f}",
    ]
    if "torch_s_per_step" in r:
        lines += [f"{'pytorch':10} {r['torch_s_per_step']:9.3f} {r['torch_tokens_per_s']:10.0f}",
                  f"ratio (ours / pytorch tokens/s): {r['ratio']:.2f}x"]
    if "achieved_flops_per_s" in r:
        lines.append(f"ours: {r['achieved_flops_per_s']:.3g} matmul FLOP/s, MFU "
                     + (f"{mfu:.1%}" if mfu is not None else "unknown (no peak for this device)")
                     + f", peak memory {r['peak_memory_gb']:.2f} GiB ({r['peak_memory_measured']}), "
                     f"compiled in {r['ours_compile_s']:.1f} s")
    return "\n".join(lines)
