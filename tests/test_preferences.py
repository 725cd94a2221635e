"""Preference pairs: construction on a hand-made scores table (both modes, margin, cap, ties
at zero, prompts without a pair), determinism, and the stage's join of scores to records."""

import json

import pytest

from montessori_jax.cli import main
from montessori_jax.errors import UserError
from montessori_jax.stages.preferences import make_pairs

# prompt A: two help, two hurt, one exactly 0; B: only helpful; C: all exactly 0;
# D: one harmful sample; E: ties in rank mode
TABLE = [
    ("a1", "A", 0.3), ("a2", "A", -0.1), ("a3", "A", 0.0), ("b1", "B", 0.1), ("a4", "A", 0.2),
    ("a5", "A", -0.4), ("b2", "B", 0.2), ("c1", "C", 0.0), ("c2", "C", 0.0), ("d1", "D", -0.1),
    ("e1", "E", 0.5), ("e2", "E", 0.5),
]


def _rows(table=TABLE):
    return [{"id": i, "seed_prompt": f"prompt {p}", "influence": x, "raw_output": f"out {i}",
             "instruction": f"inst {i}"} for i, p, x in table]


def _ids(pairs):
    return [(p["chosen_id"], p["rejected_id"]) for p in pairs]


def test_all_mode_pairs_positive_against_negative_within_each_prompt():
    pairs, stats = make_pairs(_rows())
    # A: {a1 .3, a4 .2} x {a2 -.1, a5 -.4}, largest margin first; a3 (exactly 0) is neither side
    assert _ids(pairs) == [("a1", "a5"), ("a4", "a5"), ("a1", "a2"), ("a4", "a2")]
    assert [p["margin"] for p in pairs] == pytest.approx([0.7, 0.6, 0.4, 0.3])
    first = pairs[0]
    assert first["prompt"] == "prompt A" and first["chosen"] == "out a1" and first["rejected"] == "out a5"
    assert (first["chosen_influence"], first["rejected_influence"]) == (0.3, -0.4)
    assert first["chosen_instruction"] == "inst a1" and first["prompt_index"] == 0
    assert stats["prompts"] == 5 and stats["prompts_with_pairs"] == 1 and stats["prompts_without_pair"] == 4
    assert stats["without_pair"] == {"only_chosen": 2, "no_nonzero_influence": 1, "only_rejected": 1}
    assert (stats["positive"], stats["negative"], stats["zero"], stats["samples"]) == (6, 3, 3, 12)
    assert stats["pairs"] == 4 and stats["capped"] == 0


def test_margin_and_cap():
    pairs, stats = make_pairs(_rows(), min_margin=0.5)
    assert _ids(pairs) == [("a1", "a5"), ("a4", "a5")]
    pairs, stats = make_pairs(_rows(), max_pairs_per_prompt=3)
    assert _ids(pairs) == [("a1", "a5"), ("a4", "a5"), ("a1", "a2")] and stats["capped"] == 1
    pairs, stats = make_pairs(_rows(), min_margin=0.8)
    assert pairs == [] and stats["without_pair"]["below_min_margin"] == 1


def test_rank_mode_top_against_bottom():
    pairs, stats = make_pairs(_rows(), mode="rank", top_k=1)
    # A: best a1 vs worst a5; B: b2 (.2) vs b1 (.1); C and E tie throughout; D has one sample
    assert _ids(pairs) == [("a1", "a5"), ("b2", "b1")]
    assert stats["without_pair"] == {"all_tied": 2, "single_sample": 1}
    assert [p["prompt_index"] for p in pairs] == [0, 1]
    pairs, _ = make_pairs(_rows(), mode="rank", top_k=2)
    assert _ids(pairs)[:4] == [("a1", "a5"), ("a4", "a5"), ("a1", "a2"), ("a4", "a2")]
    # k is at most half a prompt's samples: B (2 samples) still gives one pair at top_k=5
    pairs, _ = make_pairs(_rows(), mode="rank", top_k=5)
    assert ("b2", "b1") in _ids(pairs) and ("b1", "b2") not in _ids(pairs)
    assert all(p["chosen_influence"] > p["rejected_influence"] for p in pairs)


def test_deterministic_and_ties_broken_by_file_order():
    rows = _rows([("x1", "P", 0.2), ("x2", "P", 0.2), ("y1", "P", -0.3), ("y2", "P", -0.3)])
    pairs, _ = make_pairs(rows)
    assert _ids(pairs) == [("x1", "y1"), ("x1", "y2"), ("x2", "y1"), ("x2", "y2")]
    assert make_pairs(rows) == make_pairs([dict(r) for r in rows])
    # prompts in order of first appearance
    pairs, _ = make_pairs(_rows([("q1", "Q", 1.0), ("p1", "P", 1.0), ("q2", "Q", -1.0), ("p2", "P", -1.0)]))
    assert _ids(pairs) == [("q1", "q2"), ("p1", "p2")]


def test_non_finite_influence_is_neither_side():
    pairs, stats = make_pairs(_rows([("a", "P", float("nan")), ("b", "P", 0.1), ("c", "P", -0.1)]))
    assert _ids(pairs) == [("b", "c")] and stats["non_finite"] == 1


# --- the stage -------------------------------------------------------------------------------


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stage_files(tmp_path, table=TABLE):
    records = [{"id": i, "iteration": 0, "seed_prompt": f"prompt {p}", "raw_output": f"<instruction>{i}",
                "instruction": i, "response": "r"} for i, p, _ in table]
    scores = [{"id": i, "seed_prompt": f"prompt {p}", "influence": x, "estimator": "exact"} for i, p, x in table]
    (tmp_path / "influence").mkdir()
    return _write(tmp_path / "influence" / "scores.jsonl", scores), _write(tmp_path / "probe.jsonl", records)


def test_stage_writes_pairs_and_summary(tmp_path, capsys):
    scores, probe = _stage_files(tmp_path)
    out = tmp_path / "prefs"
    assert main(["preferences", "--out", str(out), f"preferences.scores={tmp_path / 'influence'}",
                 f"preferences.probe={probe}"]) == 0
    printed = capsys.readouterr().out
    assert "4 pairs from 1 of 5 seed prompts" in printed and "4 prompts without a pair" in printed
    pairs = [json.loads(line) for line in open(out / "pairs.jsonl")]
    assert _ids(pairs) == [("a1", "a5"), ("a4", "a5"), ("a1", "a2"), ("a4", "a2")]
    assert pairs[0]["chosen"] == "<instruction>a1" and pairs[0]["prompt"] == "prompt A"
    summary = json.load(open(out / "summary.json"))
    assert summary["pairs"] == 4 and summary["mode"] == "all" and summary["without_pair"]["only_chosen"] == 2
    before = (out / "pairs.jsonl").read_bytes()
    assert main(["preferences", "--out", str(out), f"preferences.scores={scores}", f"preferences.probe={probe}"]) == 0
    assert (out / "pairs.jsonl").read_bytes() == before


def test_stage_errors_name_the_problem(tmp_path):
    from montessori_jax.config import Config, load_config
    from montessori_jax.stages.preferences import run_preferences

    scores, probe = _stage_files(tmp_path)
    lines = open(scores).readlines()
    _write(tmp_path / "partial.jsonl", [json.loads(line) for line in lines[:-2]])
    cfg = load_config(Config, None, [f"preferences.scores={tmp_path / 'partial.jsonl'}", f"preferences.probe={probe}"])
    with pytest.raises(UserError, match="no score for 2 of 12 probing records.*'e1'"):
        run_preferences(cfg, str(tmp_path / "o"))
    bare = _write(tmp_path / "bare.jsonl", [{"id": i, "instruction": i, "response": "r"} for i, _, _ in TABLE])
    cfg = load_config(Config, None, [f"preferences.scores={scores}", f"preferences.probe={bare}"])
    with pytest.raises(UserError, match="bare.jsonl, line 1: no `seed_prompt`"):
        run_preferences(cfg, str(tmp_path / "o"))
    cfg = load_config(Config, None, [f"preferences.scores={scores}", f"preferences.probe={probe}",
                                     "preferences.score_field=influence_first_order"])
    with pytest.raises(UserError, match="no `influence_first_order`"):
        run_preferences(cfg, str(tmp_path / "o"))
