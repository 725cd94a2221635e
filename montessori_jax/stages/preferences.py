"""Preference pairs from influence (step 4 of the method, first half): ``montessori preferences``.

Within one seed prompt, the teacher's samples are ranked by their influence on the student.
Two ways to pair them:

- ``all`` (the paper's): every sample with influence > 0 (chosen) against every sample with
  influence < 0 (rejected). A sample at exactly 0 is neither.
- ``rank``: the ``top_k`` highest against the ``top_k`` lowest of each prompt (k at most half
  the prompt's samples), every chosen strictly above its rejected. For a weak student, where
  nearly every sample lowers the reference loss and ``all`` finds almost no rejected side.

A pair is kept when its influence margin (chosen - rejected) is at least ``min_margin``; with
``max_pairs_per_prompt`` the pairs with the largest margins are kept. Within a prompt, pairs are
ordered by margin (largest first), then by the samples' order in the probing file; prompts come
in the order they first appear there. The same inputs always give the same file.

Each row of ``pairs.jsonl`` carries all DPO needs and its provenance: ``prompt`` (the seed
prompt, the exact text the teacher was given), ``chosen`` and ``rejected`` (the teacher's raw
outputs), ``chosen_id`` / ``rejected_id``, ``chosen_influence`` / ``rejected_influence``,
``margin``, the parsed instructions, and ``prompt_index`` (the prompt's position in that order).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

from montessori_jax.config import Config, PreferencesConfig
from montessori_jax.errors import UserError
from montessori_jax.files import read_jsonl, write_json_atomic, write_jsonl_atomic

PAIRS_FILE = "pairs.jsonl"


def make_pairs(
    rows: Sequence[Mapping],
    mode: str = "all",
    top_k: int = 1,
    min_margin: float = 0.0,
    max_pairs_per_prompt: int | None = None,
) -> tuple[list[dict], dict]:
    """Pairs from scored samples; pure (no files).

    Args:
      rows: one per sample, in the probing file's order, each with ``id``, ``seed_prompt``,
        ``influence`` and ``raw_output`` (``instruction`` is copied when present).
      mode, top_k, min_margin, max_pairs_per_prompt: see the module docstring.

    Returns:
      (pairs, stats): the pair rows, and counts: ``prompts``, ``prompts_with_pairs``,
      ``prompts_without_pair`` with the reason of each (``without_pair``), ``samples``,
      ``positive`` / ``negative`` / ``zero`` / ``non_finite`` samples, ``pairs``, and
      ``capped`` (pairs dropped by ``max_pairs_per_prompt``).
    """
    if mode not in ("all", "rank"):
        raise ValueError(f"mode={mode!r}; expected 'all' or 'rank'")
    groups: dict[str, list[tuple[int, Mapping]]] = {}
    for pos, r in enumerate(rows):
        groups.setdefault(r["seed_prompt"], []).append((pos, r))

    infl = [float(r["influence"]) for r in rows]
    stats = {
        "samples": len(rows),
        "positive": sum(x > 0 for x in infl),
        "negative": sum(x < 0 for x in infl),
        "zero": sum(x == 0 for x in infl),
        "non_finite": sum(not math.isfinite(x) for x in infl),
        "prompts": len(groups),
        "prompts_with_pairs": 0,
        "prompts_without_pair": 0,
        "without_pair": {},
        "pairs": 0,
        "capped": 0,
    }
    pairs: list[dict] = []
    for prompt_index, (prompt, members) in enumerate(groups.items()):
        members = [(pos, r) for pos, r in members if math.isfinite(float(r["influence"]))]
        candidates, reason = _candidates(members, mode, top_k)
        kept = [(c, r) for c, r in candidates if _margin(c, r) >= min_margin]
        if candidates and not kept:
            reason = "below_min_margin"
        kept.sort(key=lambda cr: (-_margin(*cr), cr[0][0], cr[1][0]))
        if max_pairs_per_prompt is not None and len(kept) > max_pairs_per_prompt:
            stats["capped"] += len(kept) - max_pairs_per_prompt
            kept = kept[:max_pairs_per_prompt]
        if not kept:
            stats["prompts_without_pair"] += 1
            stats["without_pair"][reason] = stats["without_pair"].get(reason, 0) + 1
            continue
        stats["prompts_with_pairs"] += 1
        for (_, c), (_, r) in kept:
            pairs.append({
                "prompt": prompt,
                "chosen": c["raw_output"],
                "rejected": r["raw_output"],
                "chosen_id": c["id"],
                "rejected_id": r["id"],
                "chosen_influence": float(c["influence"]),
                "rejected_influence": float(r["influence"]),
                "margin": float(c["influence"]) - float(r["influence"]),
                "chosen_instruction": c.get("instruction"),
                "rejected_instruction": r.get("instruction"),
                "prompt_index": prompt_index,
            })
    stats["pairs"] = len(pairs)
    return pairs, stats


def _margin(c, r) -> float:
    return float(c[1]["influence"]) - float(r[1]["influence"])


def _candidates(members, mode: str, top_k: int):
    """(chosen, rejected) candidates of one prompt, or ([], why there are none)."""
    if mode == "all":
        chosen = [m for m in members if float(m[1]["influence"]) > 0]
        rejected = [m for m in members if float(m[1]["influence"]) < 0]
        if not chosen and not rejected:
            return [], "no_nonzero_influence"
        if not rejected:
            return [], "only_chosen"
        if not chosen:
            return [], "only_rejected"
        return [(c, r) for c in chosen for r in rejected], None
    if len(members) < 2:
        return [], "single_sample"
    ranked = sorted(members, key=lambda m: (-float(m[1]["influence"]), m[0]))
    k = min(top_k, len(ranked) // 2)
    cands = [(c, r) for c in ranked[:k] for r in ranked[-k:] if float(c[1]["influence"]) > float(r[1]["influence"])]
    return cands, (None if cands else "all_tied")


# ---------------------------------------------------------------------------------------------
# The stage


def _resolve(path: str, name: str, what: str) -> str:
    if not path:
        raise UserError(f"preferences.{what} is not set")
    if os.path.isdir(path):
        path = os.path.join(path, name)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    return path


def join_scores(scores: Sequence[Mapping], records: Sequence[Mapping], score_field: str,
                scores_path: str, records_path: str) -> list[dict]:
    """The probing records in their file's order, each with its score as ``influence``.

    Every record needs a score and every score a record (ids as the influence stage gives
    them: the record's ``id``, or its row index when it has none).
    """
    by_id = {}
    for s in scores:
        if "id" not in s:
            raise UserError(f"{scores_path}, line {s.get('_line')}: no `id`")
        if score_field not in s:
            raise UserError(f"{scores_path}, line {s.get('_line')}: no `{score_field}` (preferences.score_field)")
        v = s[score_field]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise UserError(f"{scores_path}, line {s.get('_line')}: `{score_field}` is not a number")
        by_id[json.dumps(s["id"])] = float(v)
    out, missing = [], []
    for i, r in enumerate(records):
        where = f"{records_path}, line {r.get('_line')}"
        rid = r.get("id", i)
        for key in ("seed_prompt", "raw_output"):
            if not isinstance(r.get(key), str):
                raise UserError(f"{where}: no `{key}` text (preferences need the synthesis records "
                                "of the probing set, which carry the seed prompt and the teacher's raw output)")
        key = json.dumps(rid)
        if key not in by_id:
            missing.append(rid)
            continue
        out.append({"id": rid, "seed_prompt": r["seed_prompt"], "raw_output": r["raw_output"],
                    "instruction": r.get("instruction"), "influence": by_id.pop(key)})
    if missing:
        raise UserError(f"{scores_path}: no score for {len(missing)} of {len(records)} probing records "
                        f"(first: {missing[0]!r}); is the influence stage finished?")
    if by_id:
        first = json.loads(next(iter(by_id)))
        raise UserError(f"{scores_path}: {len(by_id)} scores have no record in {records_path} (first id: {first!r})")
    return out


def run_preferences(cfg: Config, out_dir: str) -> dict:
    """Read the scores and the probing records, write ``pairs.jsonl`` and ``summary.json``."""

    pcfg: PreferencesConfig = cfg.preferences
    scores_path = _resolve(pcfg.scores, "scores.jsonl", "scores")
    records_path = _resolve(pcfg.probe, "probe.jsonl", "probe")
    rows = join_scores(read_jsonl(scores_path), read_jsonl(records_path), pcfg.score_field,
                       scores_path, records_path)
    pairs, stats = make_pairs(rows, pcfg.mode, pcfg.top_k, pcfg.min_margin, pcfg.max_pairs_per_prompt)
    os.makedirs(out_dir, exist_ok=True)
    pairs_path = os.path.join(out_dir, PAIRS_FILE)
    write_jsonl_atomic(pairs_path, pairs)
    summary = {**stats, "mode": pcfg.mode, "top_k": pcfg.top_k if pcfg.mode == "rank" else None,
               "min_margin": pcfg.min_margin, "max_pairs_per_prompt": pcfg.max_pairs_per_prompt,
               "score_field": pcfg.score_field, "scores": os.path.abspath(scores_path),
               "probe": os.path.abspath(records_path), "pairs_file": os.path.abspath(pairs_path)}
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary
