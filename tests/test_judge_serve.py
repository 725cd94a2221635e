"""`montessori judge` end to end against `montessori serve`: the embedded SmolLM2 as a weak but
real judge, served by our own OpenAI-compatible server in a subprocess on loopback."""

import json
import os

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from montessori_jax.cli import main  # noqa: E402

MT = os.path.join(os.path.dirname(__file__), "data", "mt_bench_sample.jsonl")


def _answers(path, model, turns_by_q):
    with open(path, "w") as f:
        for qid, turns in turns_by_q.items():
            f.write(json.dumps({"question_id": qid, "answer_id": f"{model}-{qid}", "model_id": model,
                                "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0}) + "\n")
    return str(path)


def test_judge_through_montessori_serve(served_smollm2, tmp_path, capsys):
    qids = [json.loads(line)["question_id"] for line in open(MT)]
    good = _answers(tmp_path / "good.jsonl", "good", {q: ["A clear, correct and complete answer.",
                                                          "A careful follow-up that keeps the first answer's facts."]
                                                      for q in qids})
    bad = _answers(tmp_path / "bad.jsonl", "bad", {q: ["no", "no"] for q in qids})
    common = ["--base-url", served_smollm2, "--model", "judge", "--questions", MT, "--max-tokens", "24",
              "--concurrency", "4"]

    assert main(["judge", *common, "--mode", "single", "--answers", good, "--out", str(tmp_path / "single")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "single" / "judgments.jsonl")]
    assert sorted((r["question_id"], r["turn"]) for r in rows) == sorted((q, t) for q in qids for t in (0, 1))
    # a real reply for every turn, parsed to a 1-10 rating or counted as a failure (-1)
    assert all(isinstance(r["reply"], str) and r["reply"] for r in rows)
    assert all(r["rating"] == -1 or 1 <= r["rating"] <= 10 for r in rows)
    summary = json.load(open(tmp_path / "single" / "summary.json"))
    assert {t["category"] for t in summary["table"]} >= {"all"}
    # resumed: nothing is asked again
    assert main(["judge", *common, "--mode", "single", "--answers", good, "--out", str(tmp_path / "single")]) == 0
    assert json.load(open(tmp_path / "single" / "summary.json"))["written"] == 0

    assert main(["judge", *common, "--mode", "pairwise", "--answers", good, "--answers", bad,
                 "--out", str(tmp_path / "pair")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "pair" / "judgments.jsonl")]
    assert len(rows) == len(qids) * 2 * 2  # questions x turns x both orders
    pair = json.load(open(tmp_path / "pair" / "summary.json"))
    overall = next(t for t in pair["table"] if t["category"] == "all")
    assert overall["wins"] + overall["ties"] + overall["losses"] + overall["failed"] == len(qids) * 2
    if overall["win_rate"] is not None:  # a weak judge may give no verdict at all
        assert 0.0 <= overall["ci_low"] <= overall["win_rate"] <= overall["ci_high"] <= 1.0
    assert "win" in capsys.readouterr().out.lower()
