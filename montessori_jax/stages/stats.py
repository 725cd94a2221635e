"""Rank statistics on host arrays: how well two influence estimators agree."""

from __future__ import annotations

import math

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x), np.float64)
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def agreement(exact: np.ndarray, approx: np.ndarray, tail: float = 0.1) -> dict:
    """Spearman, sign agreement, and the overlap of the top and bottom ``tail`` fractions."""
    exact, approx = np.asarray(exact, np.float64), np.asarray(approx, np.float64)
    k = max(1, int(round(tail * len(exact))))
    top = len(set(np.argsort(-exact)[:k]) & set(np.argsort(-approx)[:k])) / k
    bottom = len(set(np.argsort(exact)[:k]) & set(np.argsort(approx)[:k])) / k
    return {"n": int(len(exact)), "spearman": spearman(exact, approx),
            "sign_agreement": float(np.mean(np.sign(exact) == np.sign(approx))),
            f"top_{int(tail * 100)}pct_overlap": top, f"bottom_{int(tail * 100)}pct_overlap": bottom,
            "max_abs_diff": float(np.abs(exact - approx).max()) if len(exact) else 0.0}
