"""``python -m montessori_jax.bench.report DIR``: the JSON files of ``launch/gpu_bench.sh``'s
benchmarks as one ``DIR/gpu_bench.json`` and a markdown table ``DIR/gpu_bench.md``."""

from __future__ import annotations

import glob
import json
import os
import sys

from montessori_jax.files import write_json_atomic, write_lines_atomic

OUT_JSON, OUT_MD = "gpu_bench.json", "gpu_bench.md"


def _row(name: str, r: dict) -> dict:
    """One table row: what ran, tokens/s, MFU, seconds per influence example, memory."""
    row = {"name": name, "bench": r.get("bench") or r.get("benchmark"), "model": r.get("model"),
           "mfu": r.get("mfu"), "peak_memory_gb": r.get("peak_memory_gb"), "tokens_per_s": None,
           "s_per_example": None, "setting": ""}
    if row["bench"] == "generate":
        best = max(r["results"], key=lambda x: x["ours_tok_s"])
        row.update(tokens_per_s=best["ours_tok_s"],
                   setting=f"batch {best['batch']}, {r['settings']['max_new_tokens']} new tokens")
    elif row["bench"] == "sft":
        row.update(tokens_per_s=r["ours_tokens_per_s"],
                   setting=f"{r['batch']} x {r['length']}, {r['param_dtype']} params" + (", remat" if r.get("remat") else ""))
    elif row["bench"] == "dpo":
        row.update(tokens_per_s=r["ours"]["tokens_per_s_cached"],
                   setting=f"{r['pairs_per_step']} pairs x {r['length']}, cached reference, {r['param_dtype']} params")
    elif row["bench"] == "influence":
        s = r["s_per_example"]
        row.update(s_per_example={"exact": s["exact"], "first_order": s["first_order"]},
                   setting=f"{r['n_probe']} probes, D_ref {r['n_ref_rows']} rows, B={r['batch_size']}")
    return row


def collect(folder: str) -> dict:
    results, rows = {}, []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name == os.path.splitext(OUT_JSON)[0]:
            continue
        with open(path) as f:
            results[name] = json.load(f)
        rows.append(_row(name, results[name]))
    failed_path = os.path.join(folder, "failed.txt")
    failed = open(failed_path).read().split() if os.path.exists(failed_path) else []
    machine = next(iter(results.values()))["machine"] if results else None
    return {"machine": machine, "rows": rows, "failed": failed, "results": results}


def _f(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    m = report["machine"] or {}
    peaks = {r.get("peak_bf16_flops") for r in report["results"].values()} - {None}
    lines = [
        f"machine: {m.get('device_kind')} x{m.get('device_count')} ({m.get('jax_backend')}), jax {m.get('jax')}, "
        f"{m.get('cpu')} x{m.get('cpu_count')}",
        "MFU: matmul FLOPs per second against the device's bf16 dense peak "
        + (f"({', '.join(f'{p / 1e12:.0f}' for p in sorted(peaks))} TFLOP/s)" if peaks else "(unknown here: no MFU)")
        + "; generate counts 2 x params per token. Memory: the device's peak in use, or the process's peak RSS on CPU.",
        "",
        "| benchmark | model | setting | tokens/s | MFU | s/example exact | s/example first-order | peak memory GiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        s = r["s_per_example"] or {}
        lines.append(f"| {r['bench']} | {r['model']} | {r['setting']} | {_f(r['tokens_per_s'], '.0f')} | "
                     f"{_f(r['mfu'], '.1%')} | {_f(s.get('exact'), '.3f')} | {_f(s.get('first_order'), '.4f')} | "
                     f"{_f(r['peak_memory_gb'], '.1f')} |")
    for name in report["failed"]:
        lines.append(f"| {name} | failed | see {name}.log | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python -m montessori_jax.bench.report DIR (the folder of launch/gpu_bench.sh)", file=sys.stderr)
        return 2
    report = collect(argv[0])
    write_json_atomic(os.path.join(argv[0], OUT_JSON), report)
    md = markdown(report)
    write_lines_atomic(os.path.join(argv[0], OUT_MD), [md])
    print(md, end="")
    print(f"results: {os.path.join(argv[0], OUT_JSON)}, {os.path.join(argv[0], OUT_MD)}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
