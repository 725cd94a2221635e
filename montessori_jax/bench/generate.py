"""`montessori bench generate`: our sampler against transformers' ``generate``, side by side.

Same model, prompts and settings in one process: greedy decoding of ``max_new_tokens`` tokens
per row with stopping turned off on both sides, so both do exactly the same work; tokens/s is
rows x new tokens over the wall time of the whole call (prefill included), best of
``repeats`` with the two engines interleaved (a busy machine slows both alike). Our compile
time is excluded (a warm-up call per batch size) and reported; transformers gets a warm-up
call too. Greedy agreement (rows whose tokens are identical) is a sanity check.

With ``random=`` a randomly initialised model of a real shape (e.g. TinyLlama 1.1B) runs
without transformers: the GPU measurement at large batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from montessori_jax.bench.common import RANDOM_PRESETS, cost_fields, machine_info
from montessori_jax.core import model as model_lib
from montessori_jax.core import text, weights
from montessori_jax.errors import UserError
from montessori_jax.kernels import sampler as sampling

BENCH_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is to a beginner programmer.",
    "Give three tips for staying focused while studying.",
    "Translate 'good morning, how are you?' into Spanish.",
    "What causes the seasons on Earth?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "List five fruits that are rich in vitamin C.",
    "Describe the water cycle in simple terms.",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot and explain why.",
    "How do vaccines train the immune system?",
    "Write a short thank-you note to a teacher.",
    "What are the main benefits of regular exercise?",
)


def _load_transformers(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    if path == "smollm2":
        path = text.embedded_smollm2_path()
    if path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, local_files_only=True
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    hf.eval()
    hf.generation_config.eos_token_id = None  # fixed-length generation: no early stop
    return hf


def _hf_generate(hf, prompts: list[list[int]], max_new_tokens: int, pad_id: int, sampling=None) -> list[list[int]]:
    import torch

    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding, as generation wants
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    if sampling is None or sampling.greedy:
        how = dict(do_sample=False)
    else:
        how = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                          use_cache=True, **how)
    return out[:, T:].tolist()


def bench_generate(
    model: str = "smollm2",
    *,
    batch_sizes: Sequence[int] = (1, 16),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repeats: int = 3,
    transformers: bool = True,
    random: str | None = None,
    dtype: str = "float32",
    prompt_len: int = 128,
    progress=print,
) -> dict:
    """Tokens/s of our sampler (and transformers') per batch size; returns a JSON-able dict.

    model: an HF folder, a .gguf or ``"smollm2"`` (chat prompts from ``BENCH_PROMPTS``).
    random: a ``RANDOM_PRESETS`` name instead: random weights in ``dtype`` and random prompts
    of ``prompt_len`` tokens; transformers is skipped. temperature / top_p / top_k: greedy by
    default; the same settings go to transformers (whose own default top-k of 50 is off here).
    """

    params = sampling.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
    if random is not None:
        if random not in RANDOM_PRESETS:
            raise UserError(f"random model {random!r}: expected one of {sorted(RANDOM_PRESETS)}")
        cfg = model_lib.LlamaConfig(**RANDOM_PRESETS[random], param_dtype=dtype, dtype=dtype)
        ours_model = model_lib.create(cfg)
        rng = np.random.default_rng(0)
        pool = [rng.integers(3, cfg.vocab_size, prompt_len).tolist() for _ in range(max(batch_sizes))]
        pad_id, transformers, model_name = 0, False, f"random {random} ({cfg.num_params() / 1e6:.0f}M params, {dtype})"
    else:
        tok = text.load_tokenizer(model)
        ours_model = weights.load_model(model, param_dtype=dtype, dtype=dtype)
        pool = [text.encode_prompt(tok, p) for p in BENCH_PROMPTS]
        pad_id, model_name = text.pad_id(tok), model
    hf = _load_transformers(model) if transformers else None
    sampler = sampling.Sampler(ours_model, pad_id=pad_id)

    load_before = _load_average()
    rows = []
    for b in batch_sizes:
        prompts = [pool[i % len(pool)] for i in range(b)]
        t0 = time.perf_counter()
        sampler.generate(prompts, params, (), batch_size=b)  # compiles this batch's programs
        first_call_s = time.perf_counter() - t0
        if hf is not None:
            _hf_generate(hf, prompts, 4, pad_id)
        ours_s, hf_s, ours_out, hf_out = [], [], None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours_out = sampler.generate(prompts, params, (), batch_size=b)
            ours_s.append(time.perf_counter() - t0)
            if hf is not None:
                t0 = time.perf_counter()
                hf_out = _hf_generate(hf, prompts, max_new_tokens, pad_id, params)
                hf_s.append(time.perf_counter() - t0)
        n_tokens = sum(len(s[0].tokens) for s in ours_out)
        row = {
            "batch": b,
            "new_tokens": n_tokens,
            "prompt_tokens": [len(p) for p in prompts],
            "ours_s": ours_s,
            "ours_tok_s": n_tokens / min(ours_s),
            "first_call_s": first_call_s,
        }
        if hf is not None:
            hf_tokens = sum(len(t) for t in hf_out)
            row.update(
                hf_s=hf_s,
                hf_tok_s=hf_tokens / min(hf_s),
                ratio=(n_tokens / min(ours_s)) / (hf_tokens / min(hf_s)),
            )
            if params.greedy:
                row["greedy_agreement"] = sum(o[0].tokens == h for o, h in zip(ours_out, hf_out)) / b
        rows.append(row)
        if progress:
            progress(_row_line(row))
    return {
        "benchmark": "generate",
        "model": model_name,
        "settings": {"decoding": ("greedy" if params.greedy else
                                  f"temperature {temperature}, top-p {top_p}, top-k {top_k}") + ", no stop ids",
                     "max_new_tokens": max_new_tokens,
                     "repeats": repeats, "dtype": dtype, "timing": "best of repeats, engines interleaved"},
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": _load_average()},
        "compiled_programs": sampler.num_compiled,
        "compile_s": sampler.compile_seconds,
        "results": rows,
        # decoding's matmul FLOPs ~ 2 x params per new token (attention over the cache left out)
        "params": ours_model.cfg.num_params(),
        **cost_fields(2 * ours_model.cfg.num_params() * max(r["ours_tok_s"] for r in rows)),
    }


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine slows both engines (torch's more)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _row_line(row: dict) -> str:
    line = f"batch {row['batch']:>4}: ours {row['ours_tok_s']:8.1f} tok/s"
    if "hf_tok_s" in row:
        line += f"  transformers {row['hf_tok_s']:8.1f} tok/s  ratio {row['ratio']:.2f}x"
    return line


def format_table(result: dict) -> str:
    """The result as a text table."""
    has_hf = any("hf_tok_s" in r for r in result["results"])
    agree = any("greedy_agreement" in r for r in result["results"])
    head = ["batch", "new tokens", "ours tok/s"] + (["transformers tok/s", "ratio"] if has_hf else [])
    head += ["greedy agree"] if agree else []
    body = []
    for r in result["results"]:
        cells = [str(r["batch"]), str(r["new_tokens"]), f"{r['ours_tok_s']:.1f}"]
        if has_hf:
            cells += [f"{r['hf_tok_s']:.1f}", f"{r['ratio']:.2f}x"]
        if agree:
            cells.append(f"{r['greedy_agreement']:.0%}")
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    m = result["machine"]
    lines = [
        f"bench generate: {result['model']}, {result['settings']['max_new_tokens']} new tokens per row, "
        f"{result['settings']['decoding']}",
        f"machine: {m.get('cpu')} x{m.get('cpu_count')}, {m.get('memory_gb')} GB, jax {m['jax']} "
        f"({m['device_kind']}), torch {m.get('torch')}",
        "  ".join(h.rjust(w) for h, w in zip(head, widths)),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    if "achieved_flops_per_s" in result:
        mfu = result["mfu"]
        lines.append(f"best batch: ~{result['achieved_flops_per_s']:.3g} FLOP/s (2 x params per token), MFU "
                     + (f"{mfu:.1%}" if mfu is not None else "unknown (no peak for this device)")
                     + f"; peak memory {result['peak_memory_gb']:.2f} GiB ({result['peak_memory_measured']})")
    lines.append(f"compiled programs: {result['compiled_programs']} ({result['compile_s']:.1f} s, not timed); "
                 f"load average before/after: {result['load_average']['before']} / {result['load_average']['after']}")
    return "\n".join(lines)
