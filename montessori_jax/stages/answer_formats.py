"""Answer files in the evaluation tools' own formats: AlpacaEval and MT-Bench (or Vicuna-bench).

    from montessori_jax.stages import answer_formats as af
    rows = af.load_alpaca_prompts("alpaca_eval.json")
    af.write_alpaca_eval(lambda: model, tok, rows, "out/alpaca_eval", "my-student", params)
    qs = af.load_mt_questions("question.jsonl")
    af.write_mt_bench(lambda: model, tok, qs, "out/mt_bench/model_answer/my-student.jsonl", "my-student", params)

AlpacaEval: a JSON list (or JSONL, or an HF dataset) of rows with ``instruction`` goes in;
``model_outputs.json`` comes out, a JSON list of ``{instruction, output, generator, dataset}``
in input order, which ``alpaca_eval --model_outputs`` reads as it is.

MT-Bench: FastChat's ``question.jsonl`` (``question_id``, ``category``, ``turns``: one or more
user turns) goes in; ``model_answer/MODEL.jsonl`` comes out, one row per question with
``question_id``, ``answer_id``, ``model_id``, ``choices: [{index: 0, turns: [...]}]`` and
``tstamp``. Turn k is answered after the earlier turns and their answers under the chat
template. Each question is sampled at its category's temperature (``MT_BENCH_TEMPERATURES``, as
FastChat's ``temperature_config`` sets them; 0.7 for a category not listed; 0 is greedy), and a
map given by the user overrides any of them.

Random keys are keyed by (seed, row) for AlpacaEval and (seed, question, turn) for MT-Bench,
so an answer does not depend on batching, on which other rows are answered, or on a resume.
Answers go first to ``*.partial.jsonl`` beside the output (flushed per batch); a rerun after a
kill continues from it without duplicates, and the final file is written atomically once every
answer is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence

from montessori_jax.core import text
from montessori_jax.errors import UserError
from montessori_jax.core import distributed
from montessori_jax.files import open_append, read_jsonl, write_json_atomic, write_jsonl_atomic
from montessori_jax.kernels.sampler import Sampler
from montessori_jax.stages.generate import read_done
from montessori_jax.stages.pairs import _rows

# FastChat's llm_judge temperature_config (checked against lm-sys/FastChat common.py)
MT_BENCH_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
MT_BENCH_DEFAULT_TEMPERATURE = 0.7  # a category not in the table (Vicuna-bench's, say)
ALPACA_DEFAULT_DATASET = "helpful_base"  # the `dataset` of a row that names none


# ---------------------------------------------------------------------------------------------
# Inputs


def _json_rows(path: str, split: str) -> list[tuple[str, dict]]:
    """(where, row) of a JSON list, a JSONL file, a saved HF dataset folder or a hub id."""
    if os.path.isfile(path) and path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of rows")
        out = []
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise UserError(f"{path}, item {i}: expected a JSON object")
            out.append((f"{path}, item {i}", row))
        return out

    return list(_rows(path, split))


def load_alpaca_prompts(path: str, split: str = "eval") -> list[dict]:
    """AlpacaEval prompts: ``[{"instruction", "dataset", "_where"}]`` in input order."""
    out = []
    for where, row in _json_rows(path, split):
        text = row.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: no `instruction` text (an AlpacaEval row)")
        dataset = row.get("dataset")
        out.append({"instruction": text, "dataset": dataset if isinstance(dataset, str) and dataset
                    else ALPACA_DEFAULT_DATASET, "_where": where})
    if not out:
        raise UserError(f"{path}: no AlpacaEval rows")
    return out


def load_mt_questions(path: str) -> list[dict]:
    """FastChat questions: ``[{"question_id", "category", "turns", "reference"?, "_where"}]``."""

    out, seen = [], set()
    for row in read_jsonl(path):
        where = f"{path}, line {row['_line']}"
        qid = row.get("question_id")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise UserError(f"{where}: `question_id` must be a string or an integer")
        if json.dumps(qid) in seen:
            raise UserError(f"{where}: duplicate question_id {qid!r}")
        seen.add(json.dumps(qid))
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UserError(f"{where}: `turns` must be a non-empty list of user turns (strings)")
        category = row.get("category", "")
        if not isinstance(category, str):
            raise UserError(f"{where}: `category` must be a string")
        q = {"question_id": qid, "category": category, "turns": list(turns), "_where": where}
        if isinstance(row.get("reference"), list):
            q["reference"] = [str(r) for r in row["reference"]]
        out.append(q)
    if not out:
        raise UserError(f"{path}: no questions")
    return out


def mt_temperature(category: str, overrides: Mapping[str, float] | None = None) -> float:
    """The sampling temperature of a category: the override, FastChat's table, or 0.7."""
    if overrides and category in overrides:
        return float(overrides[category])
    return MT_BENCH_TEMPERATURES.get(category, MT_BENCH_DEFAULT_TEMPERATURE)


def row_key(*parts) -> int:
    """A stable non-negative int32 for the random key of one answer (e.g. question, turn)."""
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:7], 16)


# ---------------------------------------------------------------------------------------------
# The partial answer file: (id, turn) rows, resumable


def _read_partial(path: str) -> dict[tuple[str, int], dict]:
    """Rows of a partial file by (id, turn); a line cut by a kill is dropped first."""

    read_done(path)  # cuts a truncated last line, checks every other one
    rows = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows[(json.dumps(r["id"]), int(r["sample"]))] = r
    return rows


def _check_meta(path: str, meta: dict, partial: str, final: str) -> None:
    """Answers under other settings are an error (the files stay); else write the meta file."""
    old = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    started = os.path.exists(partial) or os.path.exists(final)
    if started and (old is None or old.get("fingerprint") != meta["fingerprint"]):
        raise UserError(f"{final}: written with another model, other questions or other sampling settings; "
                        "use a new --out or remove the file")
    write_json_atomic(path, meta)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _answer_round(sampler, tok, items, params, stop_ids, batch_size, system, f, progress_bar) -> None:
    """Answer ``items`` (dicts with ``id``, ``turn``, ``messages``, ``key``) and append a row each."""

    prompts = [text.encode_prompt(tok, it["messages"], system=system) for it in items]
    for idx, samples in sampler.generate_batches(prompts, params, stop_ids, batch_size=batch_size,
                                                 row_ids=[it["key"] for it in items]):
        lines = []
        for i, row_samples in zip(idx, samples):
            s = row_samples[0]
            body = s.tokens[:-1] if s.finish_reason == "stop" else s.tokens
            lines.append(json.dumps({"id": items[i]["id"], "sample": items[i]["turn"],
                                     "text": tok.decode(body, skip_special_tokens=True).strip(),
                                     "num_tokens": len(s.tokens), "finish_reason": s.finish_reason,
                                     "tstamp": time.time()}, ensure_ascii=False) + "\n")
        f.write("".join(lines))
        f.flush()
        progress_bar.update(len(lines))


# ---------------------------------------------------------------------------------------------
# AlpacaEval


def write_alpaca_eval(get_model, tok, rows: Sequence[dict], out_dir: str, generator: str, params,
                      *, batch_size: int = 16, system: str | None = None, progress: bool = True,
                      meta: dict | None = None) -> dict:
    """Answer AlpacaEval ``rows`` (``load_alpaca_prompts``) into ``out_dir/model_outputs.json``.

    get_model: a function returning the loaded model, called only when answers are missing;
    params: ``SamplingParams`` (n is 1). ``meta`` (settings to pin) is
    stored with a fingerprint in ``model_outputs.meta.json``: answers under other settings are
    an error. Returns {"file", "rows", "written", "finish"}.
    """
    from tqdm.auto import tqdm

    final = os.path.join(out_dir, "model_outputs.json")
    partial = os.path.join(out_dir, "model_outputs.partial.jsonl")
    settings = {"generator": generator, "system": system, "params": _params_dict(params),
                "rows": fingerprint([[r["instruction"], r["dataset"]] for r in rows]), **(meta or {})}
    os.makedirs(out_dir, exist_ok=True)
    _check_meta(os.path.join(out_dir, "model_outputs.meta.json"),
                {"fingerprint": fingerprint(settings), **settings}, partial, final)
    done = _read_partial(partial)
    distributed.barrier("alpaca_eval/resume")  # every process has read it before the writer appends
    todo = [{"id": i, "turn": 0, "messages": r["instruction"], "key": row_key(i)}
            for i, r in enumerate(rows) if (json.dumps(i), 0) not in done]
    written = 0
    if todo:
        sampler = Sampler(get_model(), pad_id=text.pad_id(tok))
        bar = tqdm(total=len(todo), desc="alpaca_eval", unit="answer", disable=not progress)
        with open_append(partial) as f:  # in the writer of a cluster only
            _answer_round(sampler, tok, todo, params, text.stop_token_ids(tok), batch_size, system, f, bar)
        bar.close()
        written = len(todo)
        distributed.barrier("alpaca_eval/answered")
        done = _read_partial(partial)
    answers = [done[(json.dumps(i), 0)] for i in range(len(rows))]
    if written or not os.path.exists(final):
        write_json_atomic(final, [{"instruction": r["instruction"], "output": a["text"], "generator": generator,
                                   "dataset": r["dataset"]} for r, a in zip(rows, answers)])
    return {"file": final, "rows": len(rows), "written": written, "finish": _finish(answers)}


def _params_dict(params) -> dict:
    import dataclasses

    return dataclasses.asdict(params)


def _finish(answers) -> dict:
    out: dict[str, int] = {}
    for a in answers:
        out[a["finish_reason"]] = out.get(a["finish_reason"], 0) + 1
    return out


# ---------------------------------------------------------------------------------------------
# MT-Bench


def write_mt_bench(get_model, tok, questions: Sequence[dict], out_path: str, model_id: str, params,
                   *, temperatures: Mapping[str, float] | None = None, batch_size: int = 16,
                   system: str | None = None, progress: bool = True, meta: dict | None = None) -> dict:
    """Answer FastChat ``questions`` (``load_mt_questions``) turn by turn into ``out_path``
    (``.../model_answer/MODEL.jsonl``). get_model: as for ``write_alpaca_eval``.

    params: ``SamplingParams`` for everything but the temperature, which is the category's
    (``mt_temperature``). Returns {"file", "questions", "written", "finish", "temperatures"}.
    """
    import dataclasses

    from tqdm.auto import tqdm

    temps = {q["category"]: mt_temperature(q["category"], temperatures) for q in questions}
    partial = out_path[: -len(".jsonl")] + ".partial.jsonl" if out_path.endswith(".jsonl") else out_path + ".partial"
    settings = {"model_id": model_id, "system": system, "params": _params_dict(params), "temperatures": temps,
                "questions": fingerprint([[q["question_id"], q["category"], q["turns"]] for q in questions]),
                **(meta or {})}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    _check_meta(out_path + ".meta.json", {"fingerprint": fingerprint(settings), **settings}, partial, out_path)
    done = _read_partial(partial)
    distributed.barrier("mt_bench/resume")  # every process has read it before the writer appends
    total = sum(len(q["turns"]) for q in questions)
    todo_n = total - sum((json.dumps(q["question_id"]), t) in done for q in questions for t in range(len(q["turns"])))
    written = 0
    if todo_n:
        sampler = Sampler(get_model(), pad_id=text.pad_id(tok))
        stop_ids = text.stop_token_ids(tok)
        bar = tqdm(total=todo_n, desc="mt_bench", unit="answer", disable=not progress)
        with open_append(partial) as f:  # in the writer of a cluster only
            for turn in range(max(len(q["turns"]) for q in questions)):
                by_temp: dict[float, list[dict]] = {}
                for q in questions:
                    qk = json.dumps(q["question_id"])
                    if turn >= len(q["turns"]) or (qk, turn) in done:
                        continue
                    messages = []
                    for t in range(turn):
                        messages += [{"role": "user", "content": q["turns"][t]},
                                     {"role": "assistant", "content": done[(qk, t)]["text"]}]
                    messages.append({"role": "user", "content": q["turns"][turn]})
                    by_temp.setdefault(temps[q["category"]], []).append(
                        {"id": q["question_id"], "turn": turn, "messages": messages,
                         "key": row_key(q["question_id"], turn)})
                for temp, items in sorted(by_temp.items()):
                    p = dataclasses.replace(params, temperature=temp, n=1)
                    _answer_round(sampler, tok, items, p, stop_ids, batch_size, system, f, bar)
                    written += len(items)
                f.flush()
                distributed.barrier(f"mt_bench/turn{turn}")
                done = _read_partial(partial)  # turn k+1 reads turn k's answers
        bar.close()
    rows, answers = [], []
    for q in questions:
        qk = json.dumps(q["question_id"])
        turns = [done[(qk, t)] for t in range(len(q["turns"]))]
        answers += turns
        rows.append({"question_id": q["question_id"],
                     "answer_id": fingerprint([model_id, q["question_id"], settings]),
                     "model_id": model_id, "choices": [{"index": 0, "turns": [a["text"] for a in turns]}],
                     "tstamp": max(a["tstamp"] for a in turns)})
    if written or not os.path.exists(out_path):
        write_jsonl_atomic(out_path, rows)
    return {"file": out_path, "questions": len(questions), "written": written, "finish": _finish(answers),
            "temperatures": temps}


def read_mt_answers(path: str) -> dict:
    """A FastChat answer file as {question_id key: {"model_id", "turns"}}; errors name the line."""

    out = {}
    for row in read_jsonl(path):
        where = f"{path}, line {row['_line']}"
        try:
            turns = row["choices"][0]["turns"]
            qid = row["question_id"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{where}: expected a FastChat answer row (question_id, choices[0].turns)") from None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise UserError(f"{where}: choices[0].turns must be a list of strings")
        out[json.dumps(qid)] = {"model_id": row.get("model_id"), "turns": turns}
    return out
