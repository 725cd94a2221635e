"""``montessori compare RUN_DIR...``: several runs' summaries side by side, with mean and spread.

Each run directory holds the ``summary.json`` that ``montessori run`` writes. For every student
(arm, iteration) the reference-answer NLL of each run, their mean and sample standard deviation;
then the per-run Montessori - Self-Instruct NLL difference, the teacher shift (optimized -
initial mean influence, with how many runs' 95% intervals exclude 0) and the DPO held-out reward
accuracy, each with mean and spread. Runs of the same config at different seeds (``seed=S``) give
the spread that one run cannot.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from montessori_jax.errors import UserError


def read_summary(run_dir: str) -> dict:
    path = os.path.join(run_dir, "summary.json")
    try:
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{run_dir}: no summary.json (not a finished `montessori run` directory)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(s, dict) or "rows" not in s:
        raise UserError(f"{path}: not a `montessori run` summary (no `rows`)")
    return s


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for a single value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def _seed(summary: dict, run_dir: str):
    try:
        with open(os.path.join(run_dir, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)["config"]["seed"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def compare(run_dirs: Sequence[str]) -> dict:
    """The comparison as data: per-run values and their mean and spread."""
    if not run_dirs:
        raise UserError("compare: give one or more run directories")
    summaries = [read_summary(d) for d in run_dirs]
    runs = [{"run_dir": d, "seed": _seed(s, d)} for d, s in zip(run_dirs, summaries)]

    students: dict[tuple, list] = {}
    for i, s in enumerate(summaries):
        for r in s["rows"]:
            students.setdefault((r.get("arm", "-"), r.get("iteration", 0), r.get("name", "student")),
                                [None] * len(run_dirs))[i] = r.get("ref_nll")
    rows = []
    for (arm, it, name), values in sorted(students.items(), key=lambda kv: (kv[0][1], str(kv[0][0]), kv[0][2])):
        got = [v for v in values if v is not None]
        m, sd = mean_std(got) if got else (None, None)
        rows.append({"arm": arm, "iteration": it, "name": name, "ref_nll": values, "mean": m, "std": sd})

    def metric(values):
        got = [v for v in values if v is not None]
        if not got:
            return None
        m, sd = mean_std(got)
        return {"values": values, "mean": m, "std": sd, "n": len(got)}

    iterations = sorted({r["iteration"] for r in rows if r["iteration"]})
    extra = {}
    for k in iterations:
        diff = [s.get("nll_difference", {}).get(str(k), s.get("nll_difference", {}).get(k)) for s in summaries]
        shifts = [next((t for t in s.get("teacher_shift", []) if t.get("iteration") == k), None) for s in summaries]
        held = [next((h for h in s.get("dpo_heldout", []) if h.get("iteration") == k), None) for s in summaries]
        extra[k] = {
            "nll_difference": metric(diff),
            "teacher_shift": metric([t["mean_difference"] if t else None for t in shifts]),
            "teacher_shift_ci95": [t["ci95"] if t else None for t in shifts],
            "teacher_shift_ci_above_0": sum(1 for t in shifts if t and t["ci95"][0] > 0),
            "teacher_shift_ci_below_0": sum(1 for t in shifts if t and t["ci95"][1] < 0),
            "heldout_accuracy_after": metric([h["after"]["reward_accuracy"] if h else None for h in held]),
            "heldout_margin_after": metric([h["after"]["margin"] if h else None for h in held]),
        }
    return {"runs": runs, "students": rows, "iterations": extra}


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def format_comparison(c: dict) -> str:
    n = len(c["runs"])
    heads = [os.path.basename(os.path.normpath(r["run_dir"])) or r["run_dir"] for r in c["runs"]]
    w = max([9] + [len(h) for h in heads])
    lines = ["reference-answer NLL of each student (token mean; lower is better)",
             f"{'arm':14} {'iter':>4} " + " ".join(f"{h:>{w}}" for h in heads) + f" {'mean':>9} {'std':>8}"]
    for r in c["students"]:
        lines.append(f"{str(r['arm']):14} {r['iteration']:>4} " + " ".join(f"{_f(v, '.4f'):>{w}}" for v in r["ref_nll"])
                     + f" {_f(r['mean'], '.4f'):>9} {_f(r['std'], '.4f'):>8}")
    for k, e in c["iterations"].items():
        lines.append("")
        lines.append(f"iteration {k} (mean +- sample std over {n} run{'s' if n > 1 else ''})")
        for key, label, spec in (("nll_difference", "Montessori - Self-Instruct NLL", "+.4f"),
                                 ("teacher_shift", "teacher shift (optimized - initial influence)", "+.3e"),
                                 ("heldout_accuracy_after", "DPO held-out reward accuracy after", ".2f"),
                                 ("heldout_margin_after", "DPO held-out margin after", "+.4f")):
            m = e[key]
            if m is None:
                continue
            per = ", ".join(_f(v, spec) for v in m["values"])
            lines.append(f"  {label}: {_f(m['mean'], spec)} +- {_f(m['std'], spec.lstrip('+'))}   ({per})")
        if e["teacher_shift"] is not None:
            lines.append(f"  teacher-shift 95% intervals above 0 in {e['teacher_shift_ci_above_0']} run(s), "
                         f"below 0 in {e['teacher_shift_ci_below_0']}, containing 0 in "
                         f"{e['teacher_shift']['n'] - e['teacher_shift_ci_above_0'] - e['teacher_shift_ci_below_0']}")
    return "\n".join(lines)
