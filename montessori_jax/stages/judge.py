"""``montessori judge``: MT-Bench-style judgments by any OpenAI-compatible chat endpoint.

    from montessori_jax.stages import judge
    from montessori_jax.config import JudgeConfig
    cfg = JudgeConfig(base_url="http://127.0.0.1:8000/v1", model="judge")
    s = judge.run_judge(cfg, "pairwise", "question.jsonl", ["a.jsonl", "b.jsonl"], "out/judge")

Single-answer grading (``mode="single"``): for every question and turn, the judge sees the
conversation up to that turn (earlier turns with the model's own answers) and rates the last
answer from 1 to 10, written as ``[[rating]]``. For the categories in ``REFERENCE_CATEGORIES``
(math, reasoning, coding) with a reference answer (``--references``, FastChat's answer format,
or a question's own ``reference`` list) the prompt includes the reference. A reply with no
rating in 1..10 gets rating -1 and counts as a failure, not a score.

Pairwise comparison (``mode="pairwise"``): every question and turn is judged twice, with the
two answer files as assistant A and B, then swapped. The verdict is a win for a model only when
both orders name it; anything else (the orders disagree, either says tie) is a tie. A pair where
either reply has no verdict is a failure, left out of the counts. The win rate of the first
file is (wins + ties / 2) / n, with a percentile bootstrap interval over the questions' turns
(``bootstrap`` resamples, seeded).

Judgments are appended to ``OUT/judgments.jsonl`` (one row per question, turn and order), so a
rerun continues where it stopped; requests run ``concurrency`` at a time, and connection
errors, 429 and 5xx replies are retried with exponential backoff. ``OUT/summary.json`` holds the
per-category table (also printed) and ``OUT/summary.png`` plots it.

The prompts are this project's own wording (``DEFAULT_PROMPTS``); ``prompts`` (a JSON or YAML
file with any of the same keys) replaces them, e.g. with the judge prompts of a published
benchmark read from the user's own copy.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from montessori_jax.errors import UserError
from montessori_jax.files import open_append, read_resumable_jsonl, write_json_atomic
from montessori_jax.stages import metrics as metrics_lib
from montessori_jax.stages.answer_formats import load_mt_questions, read_mt_answers

REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
FAILED = -1

DEFAULT_PROMPTS = {
    "single_system": (
        "You grade the answers of an AI assistant. Judge how helpful, correct, relevant, deep and "
        "clear the assistant's last answer is, as an expert reader would. Explain your judgment in a "
        "few sentences, then give a score from 1 (useless) to 10 (excellent) in exactly this form: "
        "[[score]], for example [[6]]."),
    "single": (
        "The conversation so far:\n\n{conversation}\n\n{reference}"
        "Grade the assistant's answer to the last user message."),
    "reference": (
        "A reference answer to the last user message, known to be correct (use it to check "
        "correctness; the assistant need not match its wording):\n{reference_answer}\n\n"),
    "pair_system": (
        "You compare two AI assistants' answers to the same user. Decide which answer to the last "
        "user message is better: more helpful, correct, relevant and clear. The order in which "
        "they are shown and their length must not sway you. Explain briefly, then give your "
        "verdict in exactly this form: [[A]] if assistant A is better, [[B]] if assistant B is "
        "better, [[C]] for a tie."),
    "pair": (
        "Conversation with assistant A:\n\n{conversation_a}\n\n"
        "Conversation with assistant B:\n\n{conversation_b}\n\n{reference}"
        "Which assistant answered the last user message better?"),
}
_RATING = (re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"), re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]"))
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


# ---------------------------------------------------------------------------------------------
# Parsing replies, the pairwise rule, the bootstrap


def parse_rating(reply: str) -> float:
    """The score of a single-answer reply: the last ``[[x]]`` (else the last ``[x]``) with x in
    1..10; ``FAILED`` (-1) when there is none."""
    for pattern in _RATING:
        found = pattern.findall(reply or "")
        if found:
            value = float(found[-1])
            return value if 1 <= value <= 10 else FAILED
    return FAILED


def parse_verdict(reply: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from the last ``[[A]]``/``[[B]]``/``[[C]]``; None if none."""
    found = _VERDICT.findall(reply or "")
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]


def combine_orders(first: str | None, swapped: str | None) -> str | None:
    """The outcome for the first file from the verdicts of the two orders (A = first file in
    ``first``, A = second file in ``swapped``): ``"win"`` / ``"loss"`` only when both orders
    agree, else ``"tie"``; None when either verdict is missing."""
    if first is None or swapped is None:
        return None
    a = {"A": "win", "B": "loss", "tie": "tie"}[first]
    b = {"A": "loss", "B": "win", "tie": "tie"}[swapped]
    return a if a == b else "tie"


def win_rate(outcomes: Sequence[str], bootstrap: int = 1000, seed: int = 0) -> dict:
    """wins, ties, losses, n, the win rate (wins + ties / 2) / n and its 95% percentile bootstrap
    interval (``bootstrap`` resamples of the outcomes with replacement, ``numpy`` seeded)."""
    scores = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes])
    n = len(scores)
    out = {"wins": int((scores == 1).sum()), "ties": int((scores == 0.5).sum()),
           "losses": int((scores == 0).sum()), "n": n}
    if n == 0:
        return {**out, "win_rate": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, n, size=(bootstrap, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {**out, "win_rate": float(scores.mean()), "ci_low": float(lo), "ci_high": float(hi)}


# ---------------------------------------------------------------------------------------------
# The endpoint


class TransientError(Exception):
    """A reply worth retrying: no connection, a timeout, 429 or a 5xx status."""


class ChatClient:
    """POST ``{base_url}/chat/completions``; transient failures retried with exponential backoff
    (``backoff * 2**attempt`` seconds, ``max_retries`` times)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, max_retries: int = 5,
                 backoff: float = 1.0, timeout: float = 300.0, max_tokens: int = 1024):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.max_retries, self.backoff, self.max_tokens = model, max_retries, backoff, max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=timeout)
        self.attempts = 0  # requests sent, retries included

    def _once(self, messages: list[dict]) -> str:
        import httpx

        self.attempts += 1
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        try:
            r = self._client.post(self.url, json=body)
        except httpx.TransportError as e:
            raise TransientError(f"{self.url}: {type(e).__name__}: {e}") from None
        if r.status_code == 429 or r.status_code >= 500:
            raise TransientError(f"{self.url}: HTTP {r.status_code}")
        if r.status_code != 200:
            raise UserError(f"{self.url}: HTTP {r.status_code}: {r.text[:200]}")
        try:
            return r.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{self.url}: not an OpenAI chat completion reply: {r.text[:200]}") from None

    def complete(self, messages: list[dict]) -> str:
        for attempt in range(self.max_retries + 1):
            try:
                return self._once(messages)
            except TransientError:
                if attempt == self.max_retries:
                    raise
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Inputs and prompts


def load_prompts(path: str | None) -> dict:
    """``DEFAULT_PROMPTS`` with the keys of a user's JSON or YAML file put over them."""
    prompts = dict(DEFAULT_PROMPTS)
    if path:
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                given = yaml.safe_load(f)  # JSON is YAML
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid JSON or YAML ({e})") from None
        if not isinstance(given, dict):
            raise UserError(f"{path}: expected a mapping of prompt names to text")
        for key, value in given.items():
            if key not in DEFAULT_PROMPTS:
                raise UserError(f"{path}: unknown prompt {key!r} (known: {', '.join(DEFAULT_PROMPTS)})")
            if not isinstance(value, str):
                raise UserError(f"{path}: prompt {key!r} must be text")
            prompts[key] = value
    return prompts


def _conversation(turns: Sequence[str], answers: Sequence[str], upto: int) -> str:
    parts = []
    for t in range(upto + 1):
        parts += [f"[User]\n{turns[t]}", f"[Assistant]\n{answers[t]}"]
    return "\n\n".join(parts)


def _fill(template: str, key: str, **values) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError) as e:
        raise UserError(f"judge prompt {key!r}: unknown placeholder {e} (known: {', '.join(values)})") from None


def _references(questions: Sequence[dict], path: str | None) -> dict[str, list[str]]:
    refs = {json.dumps(q["question_id"]): q["reference"] for q in questions if q.get("reference")}
    if path:
        refs.update({k: v["turns"] for k, v in read_mt_answers(path).items()})
    return refs


def build_requests(mode: str, questions: Sequence[dict], answers: Sequence[dict], prompts: Mapping[str, str],
                   references: Mapping[str, list[str]]) -> list[dict]:
    """One request per (question, turn[, order]): ``{"key", "question_id", "category", "turn",
    "order", "messages"}``. Questions missing from an answer file (or with fewer turns) are an
    error naming the file."""
    out = []
    for q in questions:
        qk = json.dumps(q["question_id"])
        got = []
        for a in answers:
            if qk not in a["rows"] or len(a["rows"][qk]["turns"]) < len(q["turns"]):
                raise UserError(f"{a['path']}: no answer to every turn of question {q['question_id']!r}")
            got.append(a["rows"][qk]["turns"])
        ref = references.get(qk) if q["category"] in REFERENCE_CATEGORIES else None
        for t in range(len(q["turns"])):
            ref_text = (_fill(prompts["reference"], "reference", reference_answer=ref[t])
                        if ref and t < len(ref) else "")
            if mode == "single":
                user = _fill(prompts["single"], "single", conversation=_conversation(q["turns"], got[0], t),
                             reference=ref_text)
                reqs = [("single", prompts["single_system"], user)]
            else:
                convs = [_conversation(q["turns"], g, t) for g in got]
                reqs = [(order, prompts["pair_system"],
                         _fill(prompts["pair"], "pair", conversation_a=convs[i], conversation_b=convs[1 - i],
                               reference=ref_text)) for order, i in (("AB", 0), ("BA", 1))]
            for order, system, user in reqs:
                out.append({"key": json.dumps([q["question_id"], t, order]), "question_id": q["question_id"],
                            "category": q["category"], "turn": t, "order": order,
                            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    return out


def read_judgments(path: str) -> dict[str, dict]:
    """Judgment rows by key; a last line cut by a kill is cut off the file first."""
    return dict(read_resumable_jsonl(path, lambda row: (row["key"], row), "judgment row"))


# ---------------------------------------------------------------------------------------------
# The command


def run_judge(cfg, mode: str, questions_path: str, answer_paths: Sequence[str], out_dir: str, *,
              references: str | None = None, progress: bool = True, client: ChatClient | None = None,
              names: Sequence[str] | None = None) -> dict:
    """Judge ``answer_paths`` (one for ``single``, two for ``pairwise``) on ``questions_path``
    with the endpoint of ``cfg`` (a ``JudgeConfig``), writing into ``out_dir``; resumes.
    ``names`` labels the answer files (default: their ``model_id``, else the file name).
    Returns the summary (also ``out_dir/summary.json``)."""
    from tqdm.auto import tqdm

    if mode not in ("single", "pairwise"):
        raise UserError(f"judge mode {mode!r}: expected 'single' or 'pairwise'")
    want = 1 if mode == "single" else 2
    if len(answer_paths) != want:
        raise UserError(f"judge --mode {mode} takes {want} answer file(s), got {len(answer_paths)}")
    if not cfg.base_url:
        raise UserError("judge: no endpoint (set --base-url or judge.base_url)")
    questions = load_mt_questions(questions_path)
    answers = [{"path": p, "rows": read_mt_answers(p)} for p in answer_paths]
    names = list(names) if names else [next((r["model_id"] for r in a["rows"].values() if r.get("model_id")),
                  os.path.splitext(os.path.basename(a["path"]))[0]) for a in answers]
    prompts = load_prompts(cfg.prompts)
    requests = build_requests(mode, questions, answers, prompts,
                              _references(questions, references or cfg.references))

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "judgments.jsonl")
    done = read_judgments(path)
    todo = [r for r in requests if r["key"] not in done]
    if todo and client is None:
        client = ChatClient(cfg.base_url, cfg.model, os.environ.get(cfg.api_key_env) or None,
                            max_retries=cfg.max_retries, backoff=cfg.backoff, max_tokens=cfg.max_tokens)
    lock = threading.Lock()
    bar = tqdm(total=len(todo), desc="judge", unit="judgment", disable=not progress)

    def one(req):
        reply = client.complete(req["messages"])
        row = {k: req[k] for k in ("key", "question_id", "category", "turn", "order")}
        row.update(judge=cfg.model, reply=reply, tstamp=time.time())
        if mode == "single":
            row["rating"] = parse_rating(reply)
        else:
            row["verdict"] = parse_verdict(reply)
        with lock, open_append(path) as f:  # in the writer of a cluster only
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            done[row["key"]] = row
            bar.update(1)

    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        futures = [pool.submit(one, r) for r in todo]
        for fut in concurrent.futures.as_completed(futures):
            exc = fut.exception()
            if exc is not None:
                for f in futures:
                    f.cancel()
                if isinstance(exc, TransientError):
                    raise UserError(f"judge: gave up after {cfg.max_retries} retries ({exc}); rerun to "
                                    "continue, judgments so far are kept") from None
                raise exc
    bar.close()

    rows = [done[r["key"]] for r in requests]
    table = (_single_table(rows) if mode == "single"
             else _pairwise_table(rows, cfg.bootstrap, cfg.seed))
    summary = {"mode": mode, "questions": questions_path, "answers": list(answer_paths), "models": names,
               "judge": cfg.model, "base_url": cfg.base_url, "judgments": path, "requests": len(requests),
               "written": len(todo), "table": table}
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    plot_table(summary, os.path.join(out_dir, "summary.png"))
    return summary


def _single_table(rows: Sequence[dict]) -> list[dict]:
    cats = sorted({r["category"] for r in rows}) + ["all"]
    out = []
    for cat in cats:
        sel = [r for r in rows if cat == "all" or r["category"] == cat]
        entry = {"category": cat}
        for name, part in (("turn1", [r for r in sel if r["turn"] == 0]), ("turn2", [r for r in sel if r["turn"] == 1]),
                           ("mean", sel)):
            ok = [r["rating"] for r in part if r["rating"] != FAILED]
            entry[name] = float(np.mean(ok)) if ok else None
        entry["n"] = sum(r["rating"] != FAILED for r in sel)
        entry["failed"] = sum(r["rating"] == FAILED for r in sel)
        out.append(entry)
    return out


def _pairwise_table(rows: Sequence[dict], bootstrap: int, seed: int) -> list[dict]:
    by_turn: dict[str, dict] = {}
    for r in rows:
        k = json.dumps([r["question_id"], r["turn"]])
        by_turn.setdefault(k, {"category": r["category"]})[r["order"]] = r["verdict"]
    outcomes = [(v["category"], combine_orders(v.get("AB"), v.get("BA"))) for v in by_turn.values()]
    out = []
    for cat in sorted({c for c, _ in outcomes}) + ["all"]:
        sel = [o for c, o in outcomes if cat == "all" or c == cat]
        ok = [o for o in sel if o is not None]
        out.append({"category": cat, **win_rate(ok, bootstrap, seed), "failed": len(sel) - len(ok)})
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(summary: dict) -> str:
    """The per-category table as text."""
    if summary["mode"] == "single":
        head = ["category", "turn 1", "turn 2", "mean", "n", "failed"]
        cells = [[r["category"], _fmt(r["turn1"], ".2f"), _fmt(r["turn2"], ".2f"), _fmt(r["mean"], ".2f"),
                  str(r["n"]), str(r["failed"])] for r in summary["table"]]
    else:
        a, b = summary["models"]
        head = ["category", f"{a} wins", "ties", f"{b} wins", f"{a} win rate", "95% CI", "failed"]
        cells = [[r["category"], str(r["wins"]), str(r["ties"]), str(r["losses"]), _fmt(r["win_rate"], ".3f"),
                  "-" if r["ci_low"] is None else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", str(r["failed"])]
                 for r in summary["table"]]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(f"{v:<{w}}" if i == 0 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(row, widths)))
             for row in [head] + cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_table(summary: dict, png_path: str) -> str | None:
    """Bars per category: the mean rating (single) or the first model's win rate with its
    interval (pairwise). None when matplotlib is absent."""
    plt = metrics_lib.pyplot()
    if plt is None:
        return None
    rows = summary["table"]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rows) + 2), 3.5), dpi=120)
    x = np.arange(len(rows))
    if summary["mode"] == "single":
        ax.bar(x, [r["mean"] or 0 for r in rows], color="C0")
        ax.set_ylim(0, 10)
        ax.set_ylabel(f"mean rating by {summary['judge']}")
        ax.set_title(f"{summary['models'][0]}: single-answer grading")
    else:
        rates = np.array([r["win_rate"] if r["win_rate"] is not None else np.nan for r in rows])
        lo = np.array([r["ci_low"] if r["ci_low"] is not None else np.nan for r in rows])
        hi = np.array([r["ci_high"] if r["ci_high"] is not None else np.nan for r in rows])
        ax.bar(x, np.nan_to_num(rates), yerr=np.nan_to_num([rates - lo, hi - rates]), capsize=3, color="C1")
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"win rate of {summary['models'][0]}")
        ax.set_title(f"{summary['models'][0]} vs {summary['models'][1]} (judge: {summary['judge']})")
    ax.set_xticks(x, [r["category"] for r in rows], rotation=20 if len(rows) > 4 else 0)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------------------------------------
# In `montessori run`: the Montessori student against the Self-Instruct student


def compare_arms(cfg, run_dir: str, eval_dirs: Mapping[tuple[str, int], str], progress: bool = True) -> dict | None:
    """Pairwise MT-Bench judgments of each iteration's Montessori student against its
    Self-Instruct student (``eval_dirs``: (arm, iteration) -> eval folder), into
    ``run_dir/iterK/judge``. None when ``judge.base_url`` or ``eval.mt_bench`` is unset or no
    iteration has both arms. Returns {"rows": [...], "table": text}."""
    if not cfg.judge.base_url or not cfg.eval.mt_bench:
        return None
    rows, texts = [], []
    for (arm, it), d in sorted(eval_dirs.items()):
        other = eval_dirs.get(("self_instruct", it))
        if arm != "montessori" or other is None:
            continue
        files = [os.path.join(x, "mt_bench", "model_answer", "student.jsonl") for x in (d, other)]
        s = run_judge(cfg.judge, "pairwise", cfg.eval.mt_bench, files, os.path.join(run_dir, f"iter{it}", "judge"),
                      progress=progress, names=["montessori", "self_instruct"])
        total = next(r for r in s["table"] if r["category"] == "all")
        rows.append({"iteration": it, **total, "summary": os.path.join(run_dir, f"iter{it}", "judge", "summary.json")})
        texts.append(f"iteration {it}, judge {cfg.judge.model}:\n{format_table(s)}")
    return {"rows": rows, "table": "\n\n".join(texts)} if rows else None
