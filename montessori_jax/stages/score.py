"""``montessori score``: mean token NLL of texts, of responses given prompts, or of a chat's
assistant turns, one output row per input row."""

from __future__ import annotations

import jax
import numpy as np

from montessori_jax.config import MeshConfig
from montessori_jax.core import distributed, sharding, text, weights
from montessori_jax.errors import UserError
from montessori_jax.files import read_jsonl, write_jsonl_atomic
from montessori_jax.kernels.scorer import Scorer
from montessori_jax.stages.pairs import check_messages


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
        check_messages(row["messages"], where)
        ex = text.encode_conversation(tok, row["messages"], system=row.get("system"), max_len=max_len)
    else:
        raise UserError(f"{where}: expected a string `text`, or `prompt` and `response`, or chat `messages`")
    if ex.loss_mask.sum() == 0:
        raise UserError(f"{where}: nothing to score (fewer than two tokens)")
    return ex


# what ``score`` and ``generate`` run on unless told: every device, rows split over ``data``
ROWS_MESH = MeshConfig(data=-1, fsdp=1, tensor=1)


def score_file(model_path: str, input_path: str, out_path: str, batch_size: int = 8,
               max_len: int | None = None, dtype: str = "float32", chat_template: str | None = None,
               mesh: MeshConfig = ROWS_MESH) -> dict:
    """``montessori score``: per input row, `nll` (mean over its scored tokens) and `tokens`.

    The model is placed on ``mesh`` and each batch's rows split over its ``data`` axis (across
    every process of a cluster); process 0 alone writes ``out_path``."""
    rows = read_jsonl(input_path)
    if not rows:
        raise UserError(f"{input_path}: no rows")
    weights.resolve_path(model_path)
    tok = text.load_tokenizer(model_path, chat_template, key="--chat-template")
    examples = [encode_score_row(tok, r, f"{input_path}, line {r['_line']}", max_len) for r in rows]
    mesh, rules = sharding.mesh_and_rules(mesh)
    with jax.set_mesh(mesh):
        model = weights.load_model(model_path, dtype=dtype, mesh=mesh, rules=rules)
        sums, counts = Scorer.of(model).nll_sums(examples, batch_size, text.pad_id(tok), progress=distributed.is_writer())

    def out_rows():
        for i, (r, s, c) in enumerate(zip(rows, sums, counts)):
            yield {"id": r.get("id", i), "nll": float(s / c), "tokens": int(c)}

    if distributed.is_writer():
        write_jsonl_atomic(out_path, out_rows())
    distributed.barrier("score")
    total = float(sums.sum() / counts.sum())
    return {"rows": len(rows), "tokens": int(counts.sum()), "mean_nll": total,
            "truncated": int(sum(e.truncated for e in examples))}
