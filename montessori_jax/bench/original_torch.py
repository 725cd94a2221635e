"""(a) of ``montessori bench influence``: the original code's influence loop, in PyTorch.

As the original's ``collect_local_data_influence`` does it: transformers' ``LlamaForCausalLM``
(in bfloat16, as the original loads it, or float32) and ``torch.optim.AdamW`` hold the warm
state, saved once with ``torch.save``; per probe the state is reloaded from disk, one optimizer
step runs on the probe padded to 1024 tokens (loss on the response tokens, transformers' mean
over them; no gradient clipping), then a pass over D_ref under ``torch.no_grad()`` with every row
padded to 1024, ``rows_per_batch`` rows a batch. L_ref is the mean of the batches' token means
(the original's reduction: equal to ours, the token mean over all of D_ref, when D_ref is one
batch); influence = L_ref(before) - L_ref(after).

The warm state is ours converted exactly: the warm params through ``weights.save_hf`` and
``from_pretrained``, AdamW's mu, nu and count into the torch optimizer's ``exp_avg``,
``exp_avg_sq`` and ``step``.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from montessori_jax.core import model as model_lib
from montessori_jax.core import weights
from montessori_jax.errors import UserError

ORIGINAL_LEN = 1024
# mode -> the torch dtype the model is loaded in
MODES = {"bf16": "bfloat16", "fp32": "float32"}


def require_torch() -> None:
    """A one-line UserError where torch is missing (before any long work starts)."""
    try:
        import torch
    except ImportError:
        raise UserError("bench influence: (a), the original procedure in PyTorch, needs torch: "
                        "pip install torch==2.13.0 (or run with --original 0)") from None
    del torch  # only whether it imports


def _padded(examples, pad: int) -> dict:
    """input_ids, attention_mask and labels [n, 1024]: each example right-padded, labels -100
    off its response tokens (as the original's tokenizer wrapper masks prompts and padding)."""
    import torch

    n = len(examples)
    ids = np.full((n, ORIGINAL_LEN), pad, np.int64)
    att = np.zeros((n, ORIGINAL_LEN), np.int64)
    labels = np.full((n, ORIGINAL_LEN), -100, np.int64)
    for i, e in enumerate(examples):
        k = len(e)
        if k > ORIGINAL_LEN:
            raise ValueError(f"example {i} has {k} tokens, more than {ORIGINAL_LEN}")
        ids[i, :k], att[i, :k] = e.tokens, 1
        labels[i, :k] = np.where(e.loss_mask, e.tokens, -100)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att),
            "labels": torch.from_numpy(labels)}


def write_warm_hf(graphdef, params: dict, folder: str) -> str:
    """The warm params as an HF float32 folder (each mode loads it in its own dtype)."""
    return weights.save_hf(model_lib.merge_params(graphdef, params), folder, dtype="float32")


def run_mode(mode: str, hf_dir: str, cfg, mu: dict, nu: dict, count: int, hp, ref_ex, probes,
             rows_per_batch: int, pad: int, workdir: str, say=lambda *a, **k: None) -> dict:
    """The original loop in one mode ("bf16" or "fp32"). Returns the per-probe seconds (reload,
    step, reference pass), the influences and the baseline L_ref."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, MODES[mode])
    tm = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    opt = torch.optim.AdamW(tm.parameters(), lr=hp.lr, betas=(hp.b1, hp.b2), eps=hp.eps,
                            weight_decay=hp.weight_decay)
    named = dict(tm.named_parameters())
    moments = dict(weights.hf_arrays(cfg, nu))
    for name, m in weights.hf_arrays(cfg, mu):
        p = named[name]
        opt.state[p] = {"step": torch.tensor(float(count)), "exp_avg": torch.tensor(m, dtype=p.dtype),
                        "exp_avg_sq": torch.tensor(moments[name], dtype=p.dtype)}
    if len(opt.state) != len(named):
        raise ValueError(f"AdamW state for {len(opt.state)} of the {len(named)} torch parameters")
    path = os.path.join(workdir, f"warm_{mode}.pt")
    torch.save({"model": tm.state_dict(), "optimizer": opt.state_dict()}, path)

    # the original wraps the model's forward in bf16 autocast (accelerate, mixed_precision="bf16")
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16"
                else contextlib.nullcontext)
    ref_batches = [_padded(ref_ex[i:i + rows_per_batch], pad) for i in range(0, len(ref_ex), rows_per_batch)]

    def ref_loss() -> float:
        tm.eval()
        total = 0.0
        with torch.no_grad(), autocast():
            for b in ref_batches:
                total += tm(**b).loss.item()
        return total / len(ref_batches)

    def reload():
        state = torch.load(path, weights_only=True)
        tm.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    reload()
    before = ref_loss()
    reload_s, step_s, refpass_s, influence = [], [], [], []
    for i, e in enumerate(probes):
        t0 = time.perf_counter()
        reload()
        t1 = time.perf_counter()
        tm.train()
        opt.zero_grad()
        with autocast():
            loss = tm(**_padded([e], pad)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        after = ref_loss()
        t3 = time.perf_counter()
        reload_s.append(t1 - t0)
        step_s.append(t2 - t1)
        refpass_s.append(t3 - t2)
        influence.append(before - after)
        say(f"  {mode} probe {i + 1}/{len(probes)}: {t3 - t0:.1f} s")
    os.remove(path)  # the next mode writes its own
    return {"reload": reload_s, "step": step_s, "reference_pass": refpass_s, "influence": influence,
            "baseline_ref_loss": before, "torch": torch.__version__}
