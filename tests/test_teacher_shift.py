"""The teacher shift's statistics and probe file, and `montessori compare`, on hand-made data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from montessori_jax.cli import main
from montessori_jax.errors import UserError
from montessori_jax.stages import compare, teacher_shift


def test_shift_stats_by_hand():
    initial = np.array([-1.0, 0.0, 1.0, 2.0])  # mean 0.5, median 0.5, 2 of 4 > 0
    optimized = np.array([1.0, 2.0, 3.0])  # mean 2, median 2, 3 of 3 > 0
    s = teacher_shift.shift_stats(initial, optimized, seed=0, samples=2000)
    assert s["initial"] == {"n": 4, "mean": 0.5, "median": 0.5, "fraction_positive": 0.5}
    assert s["optimized"] == {"n": 3, "mean": 2.0, "median": 2.0, "fraction_positive": 1.0}
    assert s["mean_difference"] == 1.5
    lo, hi = s["ci95"]
    # each bootstrap mean lies within its sample's range: the difference within [1 - 2, 3 - (-1)]
    assert -1.0 <= lo < 1.5 < hi <= 4.0
    # the same seed, the same interval; a constant difference has a zero-width interval
    assert teacher_shift.shift_stats(initial, optimized, seed=0, samples=2000)["ci95"] == [lo, hi]
    flat = teacher_shift.shift_stats(np.full(5, 1.0), np.full(5, 3.0))
    assert flat["ci95"] == [2.0, 2.0] and flat["verdict"] == "the optimized teacher's data helps more"
    assert teacher_shift.shift_stats(np.full(5, 3.0), np.full(5, 1.0))["verdict"] == "the initial teacher's data helps more"
    same = teacher_shift.shift_stats(np.array([-1.0, 1.0] * 10), np.array([1.0, -1.0] * 10))
    assert same["mean_difference"] == 0.0 and same["verdict"] == "no measurable shift"


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_write_probe_takes_the_same_number_from_each(tmp_path):
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    _write(a, [{"id": f"x{i}", "instruction": f"a{i}", "response": "r"} for i in range(5)])
    _write(b, [{"id": f"x{i}", "instruction": f"b{i}", "response": "r"} for i in range(3)])
    out = str(tmp_path / "probe.jsonl")
    assert teacher_shift.write_probe(out, {"initial": a, "optimized": b}, None) == {"initial": 3, "optimized": 3}
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == ["initial/x0", "initial/x1", "initial/x2",
                                       "optimized/x0", "optimized/x1", "optimized/x2"]
    assert [r["source"] for r in rows] == ["initial"] * 3 + ["optimized"] * 3
    assert teacher_shift.write_probe(out, {"initial": a, "optimized": b}, 2) == {"initial": 2, "optimized": 2}
    _write(b, [])
    with pytest.raises(UserError, match="b.jsonl: no rows"):
        teacher_shift.write_probe(out, {"initial": a, "optimized": b}, None)


def test_format_lines():
    s = {"estimator": "first_order", "rows_per_side": 3, "mean_difference": 1.5, "ci95": [0.25, 2.5],
         "verdict": "the optimized teacher's data helps more",
         "initial": {"mean": 0.5, "median": 0.5, "fraction_positive": 0.5},
         "optimized": {"mean": 2.0, "median": 2.0, "fraction_positive": 1.0}}
    text = teacher_shift.format_lines(s)
    assert "3 instructions per teacher" in text
    assert "optimized - initial: 1.500e+00, 95% CI [2.500e-01, 2.500e+00]" in text
    assert "50%" in text and "100%" in text


def _run_summary(folder, seed, base, mont, si, shift, ci, acc):
    os.makedirs(folder)
    rows = [{"arm": "base", "iteration": 0, "name": "student", "ref_nll": base},
            {"arm": "montessori", "iteration": 1, "name": "student", "ref_nll": mont},
            {"arm": "self_instruct", "iteration": 1, "name": "student", "ref_nll": si}]
    summary = {"rows": rows, "nll_difference": {"1": mont - si},
               "teacher_shift": [{"iteration": 1, "mean_difference": shift, "ci95": ci}],
               "dpo_heldout": [{"iteration": 1, "pairs": 2, "before": {"reward_accuracy": 0.0, "margin": 0.0, "loss": 0.69},
                                "after": {"reward_accuracy": acc, "margin": 0.01, "loss": 0.68}}]}
    json.dump(summary, open(os.path.join(folder, "summary.json"), "w"))
    json.dump({"config": {"seed": seed}}, open(os.path.join(folder, "manifest.json"), "w"))


def test_compare_means_and_spread(tmp_path, capsys):
    a, b = str(tmp_path / "s0"), str(tmp_path / "s1")
    _run_summary(a, 0, 2.0, 1.9, 2.0, 0.002, [0.001, 0.003], 1.0)
    _run_summary(b, 1, 2.0, 2.1, 2.0, -0.002, [-0.004, 0.001], 0.5)
    c = compare.compare([a, b])
    assert [r["seed"] for r in c["runs"]] == [0, 1]
    mont = next(r for r in c["students"] if r["arm"] == "montessori")
    assert mont["mean"] == pytest.approx(2.0) and mont["std"] == pytest.approx(np.std([1.9, 2.1], ddof=1))
    e = c["iterations"][1]
    assert e["nll_difference"]["mean"] == pytest.approx(0.0) and e["nll_difference"]["std"] == pytest.approx(np.sqrt(0.02))
    assert e["teacher_shift"]["mean"] == pytest.approx(0.0) and e["teacher_shift_ci_above_0"] == 1
    assert e["teacher_shift_ci_below_0"] == 0 and e["heldout_accuracy_after"]["mean"] == 0.75
    assert main(["compare", a, b, "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "montessori" in out and "teacher shift" in out and "above 0 in 1 run(s)" in out
    assert json.load(open(tmp_path / "c.json"))["iterations"]["1"]["teacher_shift"]["n"] == 2
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "no summary.json" in capsys.readouterr().err
