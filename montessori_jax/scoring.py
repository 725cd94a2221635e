"""Mean token NLL of texts (or of responses given prompts) under a model: ``montessori score``.

This is what evaluation and the reference loss build on: one jitted program per length
bucket returns each row's (nll_sum, count).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from montessori_jax import model as model_lib
from montessori_jax import text
from montessori_jax.errors import UserError
from montessori_jax.files import write_jsonl_atomic
from montessori_jax.losses import token_nll


def read_jsonl(path: str) -> list[dict]:
    """All rows of a JSONL file; a line that is not a JSON object is an error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            row["_line"] = n
            rows.append(row)
    return rows


def encode_score_row(tok, row: dict, where: str, max_len: int | None = None) -> text.Example:
    """`text` (every token after the first is scored), `prompt` + `response` under the chat
    template (response tokens only), or a `messages` conversation (every assistant turn's
    tokens and its end-of-turn token)."""
    if isinstance(row.get("text"), str):
        ids = np.asarray(text.encode_text(tok, row["text"]), np.int32)
        truncated = max_len is not None and len(ids) > max_len
        ids = ids[:max_len] if truncated else ids
        mask = np.ones(len(ids), bool)
        mask[:1] = False
        ex = text.Example(tokens=ids, loss_mask=mask, truncated=truncated)
    elif isinstance(row.get("prompt"), (str, list)) and isinstance(row.get("response"), str):
        ex = text.encode_example(tok, row["prompt"], row["response"], system=row.get("system"), max_len=max_len)
    elif "messages" in row:
        from montessori_jax.pairs import check_messages

        check_messages(row["messages"], where)
        ex = text.encode_conversation(tok, row["messages"], system=row.get("system"), max_len=max_len)
    else:
        raise UserError(f"{where}: expected a string `text`, or `prompt` and `response`, or chat `messages`")
    if ex.loss_mask.sum() == 0:
        raise UserError(f"{where}: nothing to score (fewer than two tokens)")
    return ex


class Scorer:
    """One jitted program giving each row's (nll_sum, count) under params (graphdef, params)."""

    def __init__(self, graphdef, params: dict):
        self.params = params

        def nll(params, batch):
            logits = model_lib.apply(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
            return token_nll(logits, batch["tokens"], batch["loss_mask"])

        self._nll = jax.jit(nll)

    @classmethod
    def of(cls, model) -> "Scorer":
        return cls(*model_lib.split_params(model))

    def nll_sums(self, examples: Sequence[text.Example], batch_size: int = 8, pad_id: int = 0,
                 progress: bool = False, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-example (nll_sum, count) in input order (under ``params`` when given)."""
        params = self.params if params is None else params
        sums = np.zeros(len(examples), np.float64)
        counts = np.zeros(len(examples), np.int64)
        bar = tqdm(total=len(examples), desc="score", unit="row", disable=not progress)
        for idx, batch in text.batches(examples, batch_size, pad_id=pad_id):
            s, c = jax.device_get(self._nll(params, batch))
            n = len(idx)
            sums[idx], counts[idx] = s[:n], c[:n]
            bar.update(n)
        bar.close()
        return sums, counts


def score_file(model_path: str, input_path: str, out_path: str, batch_size: int = 8,
               max_len: int | None = None, dtype: str = "float32", chat_template: str | None = None) -> dict:
    """``montessori score``: per input row, `nll` (mean over its scored tokens) and `tokens`."""
    from montessori_jax import weights

    rows = read_jsonl(input_path)
    if not rows:
        raise UserError(f"{input_path}: no rows")
    weights.resolve_path(model_path)
    tok = text.load_tokenizer(model_path, chat_template, key="--chat-template")
    examples = [encode_score_row(tok, r, f"{input_path}, line {r['_line']}", max_len) for r in rows]
    model = weights.load_model(model_path, dtype=dtype)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    sums, counts = Scorer.of(model).nll_sums(examples, batch_size, pad_id, progress=True)

    def out_rows():
        for i, (r, s, c) in enumerate(zip(rows, sums, counts)):
            yield {"id": r.get("id", i), "nll": float(s / c), "tokens": int(c)}

    write_jsonl_atomic(out_path, out_rows())
    total = float(sums.sum() / counts.sum())
    return {"rows": len(rows), "tokens": int(counts.sum()), "mean_nll": total,
            "truncated": int(sum(e.truncated for e in examples))}
