"""`montessori judge`: the rating parser, the pairwise rule, the bootstrap interval, and the
command end to end against a tiny local OpenAI-style server (retries after 500s, resume)."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from montessori_jax.cli import main
from montessori_jax.config import JudgeConfig
from montessori_jax.errors import UserError
from montessori_jax.stages import judge

MT = os.path.join(os.path.dirname(__file__), "data", "mt_bench_sample.jsonl")


def test_parse_rating():
    assert judge.parse_rating("Clear and correct. Rating: [[8]]") == 8
    assert judge.parse_rating("[[3]] at first, but on reflection [[7.5]]") == 7.5
    assert judge.parse_rating("score [6]") == 6
    assert judge.parse_rating("[[11]]") == judge.FAILED
    assert judge.parse_rating("no score here") == judge.FAILED
    assert judge.parse_verdict("B is clearer. [[B]]") == "B"
    assert judge.parse_verdict("[[C]]") == "tie" and judge.parse_verdict("A wins") is None


def test_pairwise_rule_needs_both_orders():
    # in the swapped order, "B" names the first file
    assert judge.combine_orders("A", "B") == "win"
    assert judge.combine_orders("B", "A") == "loss"
    assert judge.combine_orders("A", "A") == "tie"  # position bias: inconsistent
    assert judge.combine_orders("A", "tie") == "tie"
    assert judge.combine_orders("tie", "tie") == "tie"
    assert judge.combine_orders(None, "B") is None


def test_win_rate_and_bootstrap():
    r = judge.win_rate(["win", "tie", "loss", "win"])
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == 0.625 and r["ci_low"] <= 0.625 <= r["ci_high"]
    assert judge.win_rate(["win", "tie", "loss", "win"], seed=3) == judge.win_rate(["win", "tie", "loss", "win"], seed=3)
    # one win and one loss: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% percentiles of many resamples are 0 and 1
    r = judge.win_rate(["win", "loss"], bootstrap=4000)
    assert (r["win_rate"], r["ci_low"], r["ci_high"]) == (0.5, 0.0, 1.0)
    r = judge.win_rate(["tie"] * 5)
    assert (r["win_rate"], r["ci_low"], r["ci_high"]) == (0.5, 0.5, 0.5)
    assert judge.win_rate([])["win_rate"] is None


class FakeJudge(BaseHTTPRequestHandler):
    """Fails the first `fail` requests with 500; then rates an answer containing GOOD 9, else 4
    (and says nothing parseable for an answer containing MUMBLE); prefers the GOOD side."""

    fail = 0
    calls: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.calls.append(body)
        if cls.fail > 0:
            cls.fail -= 1
            self.send_response(500)
            self.end_headers()
            return
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        last_answer = user.split("[Assistant]\n")[-1]
        if "[[A]]" in system:
            a, b = user.split("Conversation with assistant B:")
            a_last, b_last = a.split("[Assistant]\n")[-1], b.split("[Assistant]\n")[-1]
            reply = "[[A]]" if "GOOD" in a_last and "GOOD" not in b_last else (
                "[[B]]" if "GOOD" in b_last and "GOOD" not in a_last else "[[C]]")
        elif "MUMBLE" in last_answer:
            reply = "hmm"
        else:
            reply = f"ref={'A reference answer' in user} [[{9 if 'GOOD' in last_answer else 4}]]"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    FakeJudge.fail, FakeJudge.calls = 0, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def _answers(path, model_id, turns_by_qid):
    path.write_text("".join(json.dumps({"question_id": q, "answer_id": f"{model_id}{q}", "model_id": model_id,
                                        "choices": [{"index": 0, "turns": t}], "tstamp": 0.0}) + "\n"
                            for q, t in turns_by_qid.items()))
    return str(path)


def test_single_grading_retries_resume_and_table(server, tmp_path, monkeypatch):
    monkeypatch.setattr(judge.time, "sleep", lambda s: None)
    a = _answers(tmp_path / "a.jsonl", "alpha", {9001: ["GOOD lines", "plain"], 9002: ["GOOD 42", "MUMBLE"],
                                                  9003: ["the bird", "GOOD the dog"]})
    FakeJudge.fail = 2  # two 500s, then answers: retried with backoff
    cfg = JudgeConfig(base_url=server, model="fake", concurrency=1)
    s = judge.run_judge(cfg, "single", MT, [a], str(tmp_path / "j"), progress=False)
    assert len(FakeJudge.calls) == 6 + 2
    table = {r["category"]: r for r in s["table"]}
    assert table["writing"]["turn1"] == 9 and table["writing"]["turn2"] == 4
    assert table["math"]["turn1"] == 9 and table["math"]["turn2"] is None and table["math"]["failed"] == 1
    assert table["all"]["n"] == 5 and table["all"]["mean"] == pytest.approx((9 + 4 + 9 + 4 + 9) / 5)
    rows = [json.loads(line) for line in open(tmp_path / "j" / "judgments.jsonl")]
    refs = {(r["question_id"], r["turn"]): r["reply"].startswith("ref=True") for r in rows if r["rating"] != -1}
    assert refs == {(9001, 0): False, (9001, 1): False, (9002, 0): True, (9003, 0): True, (9003, 1): True}
    assert os.path.getsize(tmp_path / "j" / "summary.png") > 0

    # a kill mid-line: the rerun asks only for what is missing
    raw = (tmp_path / "j" / "judgments.jsonl").read_bytes()
    cut = raw.index(b"\n", raw.index(b"\n") + 1) + 1
    (tmp_path / "j" / "judgments.jsonl").write_bytes(raw[: cut + 20])
    FakeJudge.calls = []
    again = judge.run_judge(JudgeConfig(base_url=server, model="fake", concurrency=3), "single", MT, [a],
                            str(tmp_path / "j"), progress=False)
    assert len(FakeJudge.calls) == 4 and again["written"] == 4
    assert again["table"] == s["table"]
    assert len(open(tmp_path / "j" / "judgments.jsonl").readlines()) == 6


def test_pairwise_both_orders_and_cli(server, tmp_path, capsys):
    a = _answers(tmp_path / "a.jsonl", "alpha", {9001: ["GOOD", "GOOD"], 9002: ["GOOD", "x"], 9003: ["x", "GOOD"]})
    b = _answers(tmp_path / "b.jsonl", "beta", {9001: ["x", "GOOD"], 9002: ["x", "GOOD"], 9003: ["x", "y"]})
    out = tmp_path / "p"
    assert main(["judge", "--base-url", server, "--model", "fake", "--mode", "pairwise", "--questions", MT,
                 "--answers", a, "--answers", b, "--out", str(out), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    assert "alpha wins" in printed and "beta wins" in printed and "all" in printed
    s = json.load(open(out / "summary.json"))
    assert len(FakeJudge.calls) == 12 and s["models"] == ["alpha", "beta"]
    orders = {json.loads(line)["order"] for line in open(out / "judgments.jsonl")}
    assert orders == {"AB", "BA"}
    total = {r["category"]: r for r in s["table"]}["all"]
    # wins: 9001 t1, 9002 t1, 9003 t2; losses: 9002 t2; ties: 9001 t2 (both GOOD), 9003 t1
    assert (total["wins"], total["ties"], total["losses"]) == (3, 2, 1)
    assert total["win_rate"] == pytest.approx(4 / 6)

    # a missing answer: a one-line error naming the file
    short = _answers(tmp_path / "c.jsonl", "gamma", {9001: ["a", "b"]})
    with pytest.raises(UserError, match="c.jsonl: no answer to every turn of question 9002"):
        judge.run_judge(JudgeConfig(base_url=server), "pairwise", MT, [a, short], str(tmp_path / "q"), progress=False)


def test_user_prompts_file(tmp_path):
    p = tmp_path / "prompts.yaml"
    p.write_text("single: 'Rate this: {conversation}{reference}'\n")
    assert judge.load_prompts(str(p))["single"] == "Rate this: {conversation}{reference}"
    p.write_text("singel: x\n")
    with pytest.raises(UserError, match="unknown prompt 'singel'"):
        judge.load_prompts(str(p))


def test_run_compares_the_two_arms(server, tmp_path):
    from montessori_jax.config import Config, load_config

    dirs = {}
    for arm, good in (("montessori", True), ("self_instruct", False)):
        d = tmp_path / "iter1" / arm / "eval"
        (d / "mt_bench" / "model_answer").mkdir(parents=True)
        turns = ["GOOD", "GOOD"] if good else ["x", "y"]
        _answers(d / "mt_bench" / "model_answer" / "student.jsonl", "student", {q: turns for q in (9001, 9002, 9003)})
        dirs[(arm, 1)] = str(d)
    off = load_config(Config, None, [f"eval.mt_bench={MT}"])
    assert judge.compare_arms(off, str(tmp_path), dirs) is None  # no endpoint: off
    cfg = load_config(Config, None, [f"eval.mt_bench={MT}", f"judge.base_url={server}", "judge.model=fake"])
    out = judge.compare_arms(cfg, str(tmp_path), dirs, progress=False)
    assert out["rows"][0]["iteration"] == 1 and out["rows"][0]["win_rate"] == 1.0 and out["rows"][0]["wins"] == 6
    assert "montessori wins" in out["table"] and "self_instruct wins" in out["table"]
    assert os.path.exists(tmp_path / "iter1" / "judge" / "judgments.jsonl")
