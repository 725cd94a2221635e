"""`bench influence`'s (a), the original procedure in PyTorch, against our exact estimator on a
tiny random model (fp32), and its errors."""

import json
import sys

import numpy as np
import pytest

from montessori_jax.bench import influence as bench_influence
from montessori_jax.errors import UserError


def _data(tmp_path):
    """6 seed tasks (2 probes, then the 4 warm-up examples) and 2 reference rows, in the shared
    data sets' formats."""
    seed = [{"instruction": f"Task {i}: write about topic {i} and explain it to a curious reader.",
             "instances": [{"input": "" if i % 2 else f"Context {i}: a few words.",
                            "output": " ".join(f"word{j * i}" for j in range(20 + 7 * i)) + "."}]}
            for i in range(6)]
    ref = [{"instruction": f"Question {i}: what do you know about subject {i}?",
            "response": " ".join(f"fact{j + i}" for j in range(30 + 11 * i)) + "."} for i in range(2)]
    seed_path, ref_path = tmp_path / "seed.jsonl", tmp_path / "ref.jsonl"
    seed_path.write_text("".join(json.dumps(r) + "\n" for r in seed))
    ref_path.write_text("".join(json.dumps(r) + "\n" for r in ref))
    return str(ref_path), str(seed_path)


def test_torch_original_fp32_agrees_with_exact(tmp_path):
    """Both compute L_ref(before) - L_ref(after) one AdamW step on the probe later, from the same
    warm params and moments, in fp32. With 2 reference rows in one batch the original's
    reduction (the mean of its batches' token means) is our token mean over D_ref, and its probe
    loss (transformers' mean over the response tokens) is ours, so only rounding differs: torch
    and XLA sum the ~100 per-token NLLs (each about ln 512 = 6.2) and the matmuls in other
    orders, a few ulp of L_ref in each of the two losses. The bound is 16 ulp of L_ref (7.6e-6);
    lr 1e-3 makes the influences (6e-2 and 3e-3) hundreds of times larger than it, so a wrong
    state (fresh moments, another count), reduction or padding fails the check."""
    ref, seed = _data(tmp_path)
    r = bench_influence.bench_influence(random="tiny", n_ref=2, n_probe=2, n_original=2, lr=1e-3, batch_size=2,
                                        ref_rows_per_chunk=2, ref_path=ref, probe_path=seed, progress=False,
                                        original_modes=("fp32",))
    o = r["original"]["fp32"]
    tol = 16 * float(np.spacing(np.float32(r["baseline_ref_loss"])))
    ours, theirs = np.array(r["influence"]["exact"]), np.array(o["influence"])
    assert np.abs(ours).min() > 100 * tol
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=tol)
    assert o["baseline_ref_loss"] == pytest.approx(r["baseline_ref_loss"], rel=0, abs=tol)
    assert o["vs_exact"]["spearman"] == pytest.approx(1.0)
    assert set(o["breakdown_s"]) == {"reload", "step", "reference_pass"}
    assert o["s_per_example"] == pytest.approx(sum(o["breakdown_s"].values()))
    # the fp32 target only (no bf16 mode ran), and the table shows it
    assert [t["name"] for t in r["targets"]] == ["exact vs original fp32"]
    t = r["targets"][0]
    assert t["ratio"] == pytest.approx(o["s_per_example"] / r["s_per_example"]["exact"])
    table = bench_influence.format_table(r)
    assert "(a) original, fp32" in table and "exact vs original fp32" in table and "bf16" not in table


def test_without_torch_one_line_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(UserError) as e:
        bench_influence.bench_influence(random="tiny", ref_path=str(tmp_path / "absent"), progress=False)
    assert "pip install torch==2.13.0" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="expected distinct modes of bf16, fp32, jax"):
        bench_influence.bench_influence(random="tiny", original_modes=("fp16",), progress=False)
