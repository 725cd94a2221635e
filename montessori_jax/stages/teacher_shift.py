"""The teacher shift: did DPO move the teacher toward data that helps the student?

The paper's own evidence for the mechanism: the local data influence, on the same warm student
and with the same estimator, of instructions written by the initial teacher against instructions
written by the optimized teacher. Both sets are scored in one ``montessori influence`` run (the
same code path, resume and fingerprint), each row tagged with the teacher that wrote it, and the
two score distributions are compared: mean, median, fraction that helps (influence > 0), and the
difference of the means (optimized - initial) with a bootstrap 95% interval. A positive
difference means the optimized teacher writes data that lowers the student's reference loss more.

    OUT/probe.jsonl          the scored rows: id "initial/<id>" or "optimized/<id>", source
    OUT/influence/           scores.jsonl, summary.json, influence_hist.png (montessori influence)
    OUT/summary.json         the statistics below
    OUT/teacher_shift.png    both histograms overlaid
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from montessori_jax.config import Config
from montessori_jax.errors import UserError
from montessori_jax.files import read_jsonl, write_json_atomic, write_jsonl_atomic
from montessori_jax.core import distributed
from montessori_jax.stages import influence as influence_stage
from montessori_jax.stages import metrics as metrics_lib

SOURCES = ("initial", "optimized")
BOOTSTRAP_SAMPLES = 4000


def write_probe(path: str, sets: dict[str, str], n: int | None) -> dict[str, int]:
    """The first ``m`` rows of each set (``m`` = the smaller set's size, at most ``n``), ids
    prefixed with their source, written to ``path``; returns source -> rows taken."""
    rows = {}
    for source in SOURCES:
        got = [r for r in read_jsonl(sets[source])]
        if not got:
            raise UserError(f"{sets[source]}: no rows to measure the teacher shift with")
        rows[source] = got
    m = min(len(r) for r in rows.values())
    if n is not None:
        m = min(m, n)
    out = []
    for source in SOURCES:
        for i, row in enumerate(rows[source][:m]):
            row = {k: v for k, v in row.items() if k != "_line"}
            row["id"] = f"{source}/{row.get('id', i)}"
            row["source"] = source
            out.append(row)
    write_jsonl_atomic(path, out)
    return {s: m for s in SOURCES}


def shift_stats(initial: np.ndarray, optimized: np.ndarray, seed: int = 0,
                samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Per side: n, mean, median, fraction positive; the difference of the means (optimized -
    initial) with a percentile bootstrap 95% interval (each side resampled on its own)."""
    initial = np.asarray(initial, np.float64)
    optimized = np.asarray(optimized, np.float64)

    def side(x):
        return {"n": int(len(x)), "mean": float(np.mean(x)), "median": float(np.median(x)),
                "fraction_positive": float(np.mean(x > 0))}

    rng = np.random.default_rng(seed)
    a = initial[rng.integers(0, len(initial), (samples, len(initial)))].mean(axis=1)
    b = optimized[rng.integers(0, len(optimized), (samples, len(optimized)))].mean(axis=1)
    lo, hi = np.percentile(b - a, [2.5, 97.5])
    diff = float(optimized.mean() - initial.mean())
    verdict = ("the optimized teacher's data helps more" if lo > 0 else
               "the initial teacher's data helps more" if hi < 0 else "no measurable shift")
    return {"initial": side(initial), "optimized": side(optimized), "mean_difference": diff,
            "ci95": [float(lo), float(hi)], "bootstrap_samples": samples, "verdict": verdict}


def run_teacher_shift(cfg: Config, out_dir: str, *, warm_state: str, initial: str, optimized: str,
                      n: int | None = None, initial_source: str = "", progress: bool = True) -> dict:
    """Scores ``n`` rows of ``initial`` and of ``optimized`` (synthesis records) with
    ``cfg.influence`` on ``warm_state`` and compares them."""
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, "probe.jsonl")
    taken = write_probe(probe, {"initial": initial, "optimized": optimized}, n)
    distributed.barrier("teacher_shift/probe")  # every process scores the writer's probe.jsonl
    icfg = dataclasses.replace(cfg.influence, warm_state=warm_state, probe=probe)
    inf_summary = influence_stage.run_influence(dataclasses.replace(cfg, influence=icfg),
                                                os.path.join(out_dir, "influence"), progress=progress)
    influence_stage.release_reference()  # the influence stage kept L_ref's pieces for this scoring
    scores = {s: [] for s in SOURCES}
    for row in read_jsonl(os.path.join(out_dir, "influence", "scores.jsonl")):
        scores[str(row["id"]).split("/", 1)[0]].append(row["influence"])
    summary = {
        "estimator": icfg.estimator,
        "warm_state": warm_state,
        "initial_set": initial,
        "initial_source": initial_source,
        "optimized_set": optimized,
        "rows_per_side": taken["initial"],
        "baseline_ref_loss": inf_summary["baseline_ref_loss"],
        **shift_stats(np.array(scores["initial"]), np.array(scores["optimized"]), seed=cfg.seed),
    }
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    plot_shift(scores, os.path.join(out_dir, "teacher_shift.png"), summary)
    return summary


def format_lines(summary: dict, label: str = "") -> str:
    """The teacher shift as the few lines the run's final report prints."""
    i, o = summary["initial"], summary["optimized"]
    lo, hi = summary["ci95"]
    head = f"teacher shift{(' ' + label) if label else ''} ({summary['estimator']} influence on the warm student, " \
           f"{summary['rows_per_side']} instructions per teacher; > 0 helps)"
    return "\n".join([
        head,
        f"  {'teacher':10} {'mean':>11} {'median':>11} {'helps':>6}",
        f"  {'initial':10} {i['mean']:11.3e} {i['median']:11.3e} {i['fraction_positive']:6.0%}",
        f"  {'optimized':10} {o['mean']:11.3e} {o['median']:11.3e} {o['fraction_positive']:6.0%}",
        f"  optimized - initial: {summary['mean_difference']:.3e}, 95% CI [{lo:.3e}, {hi:.3e}]: {summary['verdict']}",
    ])


def plot_shift(scores: dict[str, list[float]], png_path: str, summary: dict) -> str | None:
    plt = metrics_lib.pyplot()
    if plt is None:
        return None
    values = [v for s in SOURCES for v in scores[s]]
    if not values:
        return None
    bins = np.histogram_bin_edges(values, bins=min(30, max(6, len(values) // 3)))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for source, color in zip(SOURCES, ("tab:gray", "tab:blue")):
        ax.hist(scores[source], bins=bins, alpha=0.55, color=color,
                label=f"{source} teacher (mean {np.mean(scores[source]):.2e})")
    ax.axvline(0, color="k", lw=0.8)
    lo, hi = summary["ci95"]
    ax.set_title(f"teacher shift {summary['mean_difference']:.2e} (95% CI {lo:.2e} .. {hi:.2e})", fontsize=9)
    ax.set_xlabel("influence on the warm student: L_ref(before) - L_ref(after)")
    ax.set_ylabel("instructions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def read_summary(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
