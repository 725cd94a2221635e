"""The data a run evaluates on and must keep apart: the eval set (``"default"``: the packaged
one), the prompts to answer, and the check that neither repeats an instruction of D_ref or the
seed pool (lowercased, whitespace collapsed). ``montessori eval`` warns or stops on an overlap;
``montessori run`` stops on an overlap with D_ref before any stage runs."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence

from montessori_jax.errors import UserError
from montessori_jax.files import PACKAGED_EVAL, PACKAGED_REFERENCE, PACKAGED_SEED_POOL, read_jsonl
from montessori_jax.stages import pairs as pairs_lib
from montessori_jax.stages.synthesis.seeds import load_seed_pool

DEFAULT = "default"
_SHOWN = 10  # overlapping rows listed in a message before "and N more"


class EvalOverlapWarning(UserWarning):
    """The eval set shares instructions with D_ref or the seed pool."""


# ---------------------------------------------------------------------------------------------
# Overlap with D_ref and the seed pool


def normalize_instruction(text: str) -> str:
    """Lowercased, with every run of whitespace collapsed to one space (and none at the ends)."""
    return " ".join(text.lower().split())


def prompt_text(prompt: str | Sequence[Mapping]) -> str:
    """The instruction of a pair's prompt: the text, or its chat messages' user turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if m.get("role") == "user")


def _loc(where: str) -> str:
    """``line 12`` from ``FILE, line 12`` (or ``row 3`` from ``DATASET, row 3``)."""
    return where.rsplit(", ", 1)[-1]


def find_overlaps(items: Sequence[tuple[str, str]], against: Sequence[tuple[str, str]]) -> list[dict]:
    """Rows of ``items`` whose normalized text equals a row of ``against``.

    Both are (where, text) pairs. Returns one dict per overlapping item, in item order:
    ``{"where", "instruction", "matches": [where of each equal row in against]}``.
    """
    index: dict[str, list[str]] = {}
    for where, text in against:
        index.setdefault(normalize_instruction(text), []).append(where)
    out = []
    for where, text in items:
        hits = index.get(normalize_instruction(text))
        if hits:
            out.append({"where": where, "instruction": text, "matches": list(hits)})
    return out


def overlap_message(path: str, what: str, other_path: str, rows: Sequence[dict]) -> str:
    """One line: the file, the set it overlaps, and each overlapping line with its match."""
    shown = ", ".join(f"{_loc(r['where'])} (= {_loc(r['matches'][0])})" for r in rows[:_SHOWN])
    more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
    rows_repeat = "1 row repeats an instruction" if len(rows) == 1 else f"{len(rows)} rows repeat instructions"
    return (f"{path}: {rows_repeat} of {what} {other_path} (same text after lowercasing and collapsing "
            f"whitespace), so not held out: {shown}{more}")


def check_overlap(sets: Mapping[str, tuple[str, Sequence[tuple[str, str]]]],
                  others: Mapping[str, tuple[str, str, Sequence[tuple[str, str]]]],
                  on_overlap: str = "warn") -> dict:
    """Check each evaluated file against each other set.

    sets: label -> (path, [(where, instruction)]): what is evaluated (the eval set, a prompt
      file). others: key -> (description, path, [(where, instruction)]): D_ref, the seed pool.
    on_overlap: ``"warn"`` emits one ``EvalOverlapWarning`` per (file, set) that overlaps;
      ``"error"`` raises a ``UserError`` with all their messages.

    Returns ``{"count", "messages", "<label>": {"<key>": [rows of find_overlaps]}}``.
    """
    if on_overlap not in ("warn", "error"):
        raise UserError(f"eval.on_overlap={on_overlap!r}: expected 'warn' or 'error'")
    report: dict = {"count": 0, "messages": []}
    for label, (path, items) in sets.items():
        report[label] = {}
        for key, (what, other_path, other_items) in others.items():
            rows = find_overlaps(items, other_items)
            report[label][key] = rows
            if rows:
                report["count"] += len(rows)
                report["messages"].append(overlap_message(path, what, other_path, rows))
    if report["messages"]:
        if on_overlap == "error":
            raise UserError("; ".join(report["messages"]) + " (set eval.on_overlap=warn to evaluate anyway)")
        for message in report["messages"]:
            warnings.warn(message, EvalOverlapWarning, stacklevel=3)
    return report


# ---------------------------------------------------------------------------------------------
# Inputs: the eval pairs, the prompts to answer, what to check against


def resolve_data(path: str) -> str:
    """``"default"`` -> the packaged eval set; a ``.jsonl``/``.json`` path must exist."""
    if path == DEFAULT:
        return PACKAGED_EVAL
    if not path:
        raise UserError("eval.data is empty (\"default\" is the packaged eval set)")
    if path.endswith((".jsonl", ".json")) and not os.path.isfile(path):
        raise UserError(f"{path}: no such file (eval.data)")
    return path


def load_prompt_rows(path: str) -> list[dict]:
    """Prompts to answer, as ``montessori generate`` input rows (``id`` and ``prompt`` or
    ``messages``). A row has ``prompt`` (text), chat ``messages``, or ``instruction`` (with an
    optional ``input`` appended as the eval pairs do); ``id`` defaults to the 0-based index."""
    if path.endswith(".jsonl") or os.path.isfile(path):
        rows = read_jsonl(path)
    else:
        raise UserError(f"{path}: no such file (eval.prompts takes a JSONL file)")
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{path}, line {row['_line']}"
        rid = row.get("id", i)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise UserError(f"{where}: `id` must be a string or an integer")
        if json.dumps(rid) in seen:
            raise UserError(f"{where}: duplicate id {rid!r}")
        seen.add(json.dumps(rid))
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            out.append({"id": rid, "prompt": row["prompt"], "_where": where})
        elif isinstance(row.get("messages"), list) and row["messages"]:
            msgs = row["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in msgs):
                raise UserError(f"{where}: `messages` must be a list of {{role, content}} strings")
            out.append({"id": rid, "messages": msgs, "_where": where})
        elif isinstance(row.get("instruction"), str) and row["instruction"].strip():
            text = row["instruction"]
            extra = row.get("input")
            if isinstance(extra, str) and extra.strip():
                text = f"{text}\n\n{extra}"
            out.append({"id": rid, "prompt": text, "_where": where})
        else:
            raise UserError(f"{where}: a prompt row needs `prompt`, `messages` or `instruction`")
    if not out:
        raise UserError(f"{path}: no prompts")
    return out


def prompts_from_pairs(pairs) -> list[dict]:
    """The eval pairs' prompts as generate input rows (id: the row's own or its index)."""
    out = []
    for i, p in enumerate(pairs):
        rid = p.id if isinstance(p.id, (str, int)) and not isinstance(p.id, bool) else i
        row = {"id": rid, "_where": p.where}
        if isinstance(p.prompt, str):
            row["prompt"] = p.prompt
        else:
            row["messages"] = [dict(m) for m in p.prompt]
        out.append(row)
    if len({json.dumps(r["id"]) for r in out}) != len(out):  # ids repeat: fall back to indices
        for i, row in enumerate(out):
            row["id"] = i
    return out


def overlap_sets(cfg, ecfg) -> dict:
    """D_ref and the seed pool the eval set must not repeat, as (description, path, items)."""
    ref_path = ecfg.reference or getattr(getattr(cfg, "influence", None), "reference", None) or PACKAGED_REFERENCE
    if ref_path.endswith((".jsonl", ".json")) and not os.path.isfile(ref_path):
        raise UserError(f"{ref_path}: no such file (D_ref, which the eval set must not repeat: "
                        "eval.reference or influence.reference)")
    ref = pairs_lib.load_pairs(ref_path)
    if ecfg.seed_pool:
        pool_source, fields, split = ecfg.seed_pool, None, "train"
    else:
        syn = getattr(cfg, "synthesis", None)
        pool_source = getattr(syn, "seed_pool", DEFAULT) or DEFAULT
        fields, split = getattr(syn, "seed_fields", None), getattr(syn, "seed_split", "train")
    pool = load_seed_pool(pool_source, fields, split)
    pool_path = PACKAGED_SEED_POOL if pool_source == DEFAULT else pool_source
    return {
        "reference": ("the reference set D_ref", ref_path, [(p.where, prompt_text(p.prompt)) for p in ref]),
        "seed_pool": ("the seed pool", pool_path, [(t.where, t.text) for t in pool]),
    }
