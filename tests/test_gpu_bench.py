"""launch/gpu_bench.sh in its --tiny mode (CPU, a tiny shape): every benchmark runs and the
JSON and the markdown table hold their figures."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_bench_tiny_mode_writes_json_and_table(tmp_path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on the GPU node
    env.update(PYTHON=sys.executable, GPU_BENCH_TINY="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_bench.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_bench.json").read_text())
    assert report["failed"] == []
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"generate_tiny", "sft_tiny", "influence_tiny", "dpo_tiny"}
    for name in ("generate_tiny", "sft_tiny", "dpo_tiny"):
        assert rows[name]["tokens_per_s"] > 0, name
    for r in rows.values():
        assert r["mfu"] is None  # no peak known for a CPU
        assert r["peak_memory_gb"] > 0
    infl = report["results"]["influence_tiny"]
    assert infl["n_ref_rows"] == 32 and infl["dtype"] == "bfloat16"  # tiny mode: 32 of the 256 reference rows
    assert rows["influence_tiny"]["s_per_example"]["exact"] > 0
    assert rows["influence_tiny"]["s_per_example"]["first_order"] > 0
    assert infl["achieved_flops_per_s"] > 0 and infl["exact_matmul_flops_per_example"] > 0
    assert report["results"]["sft_tiny"]["matmul_flops_per_step"] > 0
    md = (out / "gpu_bench.md").read_text()
    assert "| benchmark | model | setting | tokens/s | MFU |" in md
    assert "(unknown here: no MFU)" in md
    for bench in ("generate", "sft", "influence", "dpo"):
        assert f"| {bench} | random tiny" in md, bench
