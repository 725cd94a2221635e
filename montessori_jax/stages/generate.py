"""``montessori generate``: prompts from JSONL (or one ``--prompt``) through the sampler, samples
appended to a JSONL file row by row, so a rerun after a kill continues without duplicates."""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm

from montessori_jax.core import model as model_lib
from montessori_jax.config import MeshConfig
from montessori_jax.core import distributed, sharding, text, weights
from montessori_jax.errors import UserError
from montessori_jax.files import open_append, read_resumable_jsonl
from montessori_jax.kernels.sampler import Sampler, SamplingParams


def read_prompt_rows(path: str) -> list[dict]:
    """Input rows: JSON objects with ``prompt`` (text) or ``messages`` (chat); ``id`` optional
    (default: the row's 0-based index). Blank lines are skipped."""
    rows, ids = [], set()
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object with 'prompt' or 'messages'")
            if isinstance(row.get("prompt"), str):
                content = row["prompt"]
            elif isinstance(row.get("messages"), list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in row["messages"]
            ) and row["messages"]:
                content = row["messages"]
            else:
                raise UserError(
                    f"{path}:{lineno}: a row needs 'prompt' (a string) or 'messages' "
                    "(a list of {role, content} strings)"
                )
            rid = row.get("id", len(rows))
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise UserError(f"{path}:{lineno}: 'id' must be a string or an integer")
            if _id_key(rid) in ids:
                raise UserError(f"{path}:{lineno}: duplicate id {rid!r}")
            ids.add(_id_key(rid))
            rows.append({"id": rid, "content": content, "index": len(rows)})
    return rows


def _id_key(rid) -> str:
    return json.dumps(rid)


def read_done(out_path: str) -> set[tuple[str, int]]:
    """(id, sample) pairs already in an output file (a last line cut by a kill is cut off the
    file: ``files.read_resumable_jsonl``)."""
    return set(read_resumable_jsonl(out_path, lambda row: (_id_key(row["id"]), int(row["sample"])),
                                    "generated row (expected JSON with id and sample)"))


def generate_jsonl(
    model: str | model_lib.Llama,
    out_path: str,
    params: SamplingParams,
    *,
    prompt: str | None = None,
    input_path: str | None = None,
    tokenizer=None,
    batch_size: int = 16,
    chat_template: bool = True,
    template_file: str | None = None,
    system: str | None = None,
    progress: bool = True,
    sampler: Sampler | None = None,
    mesh: MeshConfig | None = None,
) -> dict:
    """Generate ``params.n`` samples per input row and append them to ``out_path`` as JSONL.

    model: a path (HF folder, .gguf, ``"smollm2"``) or a loaded model (then pass
    ``tokenizer``). Exactly one of ``prompt`` / ``input_path``. Output rows: ``id``,
    ``sample``, ``text``, ``num_tokens``, ``finish_reason`` (``stop`` or ``length``), written
    per batch (longest prompts first) and flushed. Pairs (id, sample) already in the file are
    skipped, so a rerun after a kill continues without duplicates. ``template_file``: a Jinja
    chat template file in place of the model's own (when ``model`` is a path). ``mesh``: where
    a model given by path is placed (prompts split over its ``data`` axis; None: one device; a
    loaded model stays where it is). Returns a summary dict.
    """
    if (prompt is None) == (input_path is None):
        raise UserError("give exactly one of a prompt or an input file")
    if isinstance(model, str):
        tokenizer = tokenizer or text.load_tokenizer(model, template_file, key="--chat-template")
        on = sharding.mesh_and_rules(mesh) if mesh is not None else (None, None)
        model = weights.load_model(model, mesh=on[0], rules=on[1])
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer")
    rows = [{"id": 0, "content": prompt, "index": 0}] if prompt is not None else read_prompt_rows(input_path)
    where = input_path or "--prompt"

    done = read_done(out_path)
    distributed.barrier("generate/resume")  # every process has read what is done before the writer appends
    missing = {r["index"]: [j for j in range(params.n) if (_id_key(r["id"]), j) not in done] for r in rows}
    todo = [r for r in rows if missing[r["index"]]]
    prompts = []
    for r in todo:
        if chat_template:
            prompts.append(text.encode_prompt(tokenizer, r["content"], system=system))
        elif isinstance(r["content"], str):
            prompts.append(text.encode_text(tokenizer, r["content"]).tolist())
        else:
            raise UserError(f"{where}: row {r['id']!r} has chat messages; they need the chat template")
    stop_ids = text.stop_token_ids(tokenizer)
    sampler = sampler or Sampler(model, pad_id=text.pad_id(tokenizer))

    n_todo = sum(len(missing[r["index"]]) for r in todo)
    summary = {"rows": len(rows), "skipped": len(rows) * params.n - n_todo, "written": 0, "tokens": 0}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    t0 = time.perf_counter()
    bar = tqdm(total=n_todo, unit="sample", disable=not progress, dynamic_ncols=True)
    with open_append(out_path) as f:  # in the writer of a cluster only
        batches = sampler.generate_batches(
            prompts, params, stop_ids, batch_size=batch_size, row_ids=[r["index"] for r in todo]
        )
        for idx, samples in batches:
            lines = []
            for i, row_samples in zip(idx, samples):
                row = todo[i]
                for j in missing[row["index"]]:
                    s = row_samples[j]
                    body = s.tokens[:-1] if s.finish_reason == "stop" else s.tokens
                    out = {"id": row["id"], "sample": j, "text": tokenizer.decode(body, skip_special_tokens=True),
                           "num_tokens": len(s.tokens), "finish_reason": s.finish_reason}
                    lines.append(json.dumps(out, ensure_ascii=False) + "\n")
                    summary["tokens"] += len(s.tokens)
            f.write("".join(lines))
            f.flush()
            summary["written"] += len(lines)
            bar.update(len(lines))
            bar.set_postfix(tok_s=f"{summary['tokens'] / (time.perf_counter() - t0):.1f}")
    bar.close()
    distributed.barrier("generate/written")  # callers read the writer's rows next
    seconds = time.perf_counter() - t0
    summary.update(seconds=round(seconds, 3), tokens_per_s=summary["tokens"] / seconds if seconds > 0 else 0.0,
                   compiled_programs=sampler.num_compiled, compile_seconds=round(sampler.compile_seconds, 3))
    return summary
