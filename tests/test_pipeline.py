"""`montessori run` end to end on a tiny random model: both arms, two iterations, the
manifest and every artifact; kill and resume; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pipeline_helpers import TaggingTeacher, tiny_overrides, write_small_sets

from montessori_jax import pipeline
from montessori_jax.config import Config, load_config
from montessori_jax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    return write_small_sets(str(tmp_path_factory.mktemp("sets")))


@pytest.fixture(scope="module")
def both_arms_run(tiny_checkpoint, small_sets, tmp_path_factory):
    model, _ = tiny_checkpoint
    ref, ev, pool = small_sets
    run_dir = str(tmp_path_factory.mktemp("run") / "r")
    cfg = load_config(Config, None, tiny_overrides(model, ref, ev, pool, arm="both", iterations=2))
    result = pipeline.run(cfg, run_dir, progress=False, generator_factory=TaggingTeacher)
    return cfg, run_dir, result


def test_both_arms_two_iterations(both_arms_run, tiny_checkpoint):
    cfg, run_dir, result = both_arms_run
    model = tiny_checkpoint[0]
    m = json.load(open(os.path.join(run_dir, "manifest.json")))
    keys = m["order"]
    assert keys[0] == "base/eval"
    # the baseline's training set comes before the teacher shift, which scores it
    assert keys[1:13] == [f"iter1/{s}" for s in (
        "montessori/synthesize", "montessori/warmup", "montessori/influence", "montessori/preferences",
        "montessori/dpo", "montessori/synthesize_train", "self_instruct/synthesize_train",
        "montessori/teacher_shift", "montessori/train", "montessori/eval", "self_instruct/train",
        "self_instruct/eval")]
    assert len(keys) == 1 + 2 * (9 + 3)
    assert all(m["stages"][k]["status"] == "done" for k in keys)
    assert m["config"]["run"]["arm"] == "both" and m["packages"]["jax"]
    for k in keys:
        rec = m["stages"][k]
        assert rec["seconds"] > 0 and rec["outputs"]
        assert all(o["sha256"] and len(o["sha256"]) == 64 for o in rec["outputs"].values()), k

    st = m["stages"]
    # iteration 2 starts from iteration 1's student (both arms) and optimized teacher (Montessori)
    assert st["iter2/montessori/warmup"]["inputs"]["student"]["path"] == "iter1/montessori/train/model"
    assert st["iter2/montessori/train"]["inputs"]["student"]["path"] == "iter1/montessori/train/model"
    assert st["iter2/self_instruct/train"]["inputs"]["student"]["path"] == "iter1/self_instruct/train/model"
    assert st["iter2/montessori/synthesize"]["inputs"]["teacher"]["path"] == "iter1/montessori/dpo/model"
    assert st["iter2/montessori/dpo"]["inputs"]["teacher"]["path"] == "iter1/montessori/dpo/model"
    assert st["iter2/montessori/synthesize_train"]["inputs"]["teacher"]["path"] == "iter2/montessori/dpo/model"
    assert st["iter1/montessori/warmup"]["inputs"]["student"]["path"] == os.path.abspath(model)
    # the baseline arm keeps the unoptimized teacher in every iteration
    for k in (1, 2):
        assert st[f"iter{k}/self_instruct/synthesize_train"]["inputs"]["teacher"]["path"] == os.path.abspath(model)
    # hashes chain: what a stage wrote is what the next one read
    assert (st["iter1/montessori/train"]["outputs"]["model"]["sha256"]
            == st["iter2/montessori/warmup"]["inputs"]["student"]["sha256"])
    assert (st["iter1/montessori/dpo"]["outputs"]["model"]["sha256"]
            == st["iter2/montessori/synthesize"]["inputs"]["teacher"]["sha256"])
    assert (st["iter1/montessori/dpo"]["outputs"]["model"]["sha256"]
            != st["iter1/montessori/dpo"]["inputs"]["teacher"]["sha256"])  # DPO moved the teacher

    # artifacts
    it = os.path.join(run_dir, "iter1", "montessori")
    probe = _jsonl(os.path.join(it, "synthesize", "probe.jsonl"))
    warm = _jsonl(os.path.join(it, "synthesize", "warmup.jsonl"))
    assert probe and warm and not {r["seed_prompt"] for r in probe} & {r["seed_prompt"] for r in warm}
    scores = _jsonl(os.path.join(it, "influence", "scores.jsonl"))
    assert sorted(r["id"] for r in scores) == sorted(r["id"] for r in probe)
    pairs = _jsonl(os.path.join(it, "preferences", "pairs.jsonl"))
    assert pairs, "rank mode pairs every prompt with two or more distinct scores"
    assert os.path.exists(os.path.join(it, "dpo", "model", "config.json"))
    train = _jsonl(os.path.join(it, "synthesize_train", "records.jsonl"))
    assert len(train) == cfg.run.train_instructions
    assert all(r["teacher"].endswith(os.path.join("iter1", "montessori", "dpo", "model")) for r in train)
    base_train = _jsonl(os.path.join(run_dir, "iter1", "self_instruct", "synthesize_train", "records.jsonl"))
    assert len(base_train) == len(train)  # the same budget
    for arm in ("montessori", "self_instruct"):
        for k in (1, 2):
            ev = json.load(open(os.path.join(run_dir, f"iter{k}", arm, "eval", "summary.json")))
            assert ev["models"]["student"]["ref_nll"] > 0
            assert len(_jsonl(ev["models"]["student"]["answers"])) == 3

    # the teacher shift: both training sets scored on the Montessori arm's warm student
    for k in (1, 2):
        shift_dir = os.path.join(run_dir, f"iter{k}", "montessori", "teacher_shift")
        shift = json.load(open(os.path.join(shift_dir, "summary.json")))
        assert shift["rows_per_side"] == cfg.run.train_instructions
        assert shift["initial"]["n"] == shift["optimized"]["n"] == cfg.run.train_instructions
        assert shift["ci95"][0] <= shift["mean_difference"] <= shift["ci95"][1]
        assert shift["warm_state"] == os.path.join(run_dir, f"iter{k}", "montessori", "warmup", "warm_state.json")
        scores = _jsonl(os.path.join(shift_dir, "influence", "scores.jsonl"))
        assert sorted(r["id"].split("/")[0] for r in scores) == ["initial"] * 4 + ["optimized"] * 4
        assert os.path.exists(os.path.join(shift_dir, "teacher_shift.png"))
        assert st[f"iter{k}/montessori/teacher_shift"]["inputs"]["initial"]["path"] == \
            f"iter{k}/self_instruct/synthesize_train/records.jsonl"
    assert [t["iteration"] for t in result["teacher_shift"]] == [1, 2]
    assert "teacher shift iter1" in result["report"] and "95% CI" in result["report"]
    assert set(result["nll_difference"]) == {1, 2}
    saved = json.load(open(os.path.join(run_dir, "summary.json")))
    assert saved["teacher_shift"][0]["mean_difference"] == result["teacher_shift"][0]["mean_difference"]

    # the summary across arms and iterations
    rows = result["rows"]
    assert {(r["arm"], r["iteration"]) for r in rows} == {("base", 0), ("montessori", 1), ("montessori", 2),
                                                          ("self_instruct", 1), ("self_instruct", 2)}
    assert os.path.exists(os.path.join(run_dir, "summary.png"))
    assert "montessori" in result["table"] and "self_instruct" in result["table"]
    status = pipeline.format_status(m)
    assert "iter2/self_instruct/eval" in status and "done" in status


def test_rerun_skips_and_changed_config_is_an_error(both_arms_run, tiny_checkpoint, small_sets):
    cfg, run_dir, _ = both_arms_run
    before = json.load(open(os.path.join(run_dir, "manifest.json")))
    pipeline.run(cfg, run_dir, progress=False, generator_factory=TaggingTeacher)  # all done: nothing runs
    after = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert {k: v["finished"] for k, v in after["stages"].items()} == {k: v["finished"] for k, v in before["stages"].items()}

    model, _ = tiny_checkpoint
    ref, ev, pool = small_sets
    changed = load_config(Config, None, tiny_overrides(model, ref, ev, pool) + ["dpo.beta=0.2"])
    with pytest.raises(UserError, match=r"iter1/montessori/dpo ran with other settings.*dpo\.beta.*--restart-from"):
        pipeline.run(changed, run_dir, progress=False, generator_factory=TaggingTeacher)
    assert json.load(open(os.path.join(run_dir, "manifest.json")))["stages"] == after["stages"]


def _run_sub(run_dir, model, ref, ev, pool, kill_at=None):
    env = dict(os.environ)
    env.pop("MONTESSORI_KILL_AT", None)
    if kill_at:
        env["MONTESSORI_KILL_AT"] = kill_at
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, os.path.join(HERE, "pipeline_helpers.py"), run_dir, model, ref, ev, pool],
                          env=env, capture_output=True, text=True, timeout=900)


def test_kill_and_resume_equals_uninterrupted(tiny_checkpoint, small_sets, tmp_path):
    model, _ = tiny_checkpoint
    ref, ev, pool = small_sets
    clean = str(tmp_path / "clean")
    p = _run_sub(clean, model, ref, ev, pool)
    assert p.returncode == 0, p.stderr[-3000:]

    killed = str(tmp_path / "killed")
    for point in ("synthesize.round", "sft.checkpoint", "influence.chunk", "dpo.checkpoint"):
        p = _run_sub(killed, model, ref, ev, pool, kill_at=point)
        assert p.returncode == -9, (point, p.returncode, p.stderr[-3000:])
        m = json.load(open(os.path.join(killed, "manifest.json")))
        assert "running" in {r["status"] for r in m["stages"].values()}, point
    p = _run_sub(killed, model, ref, ev, pool)
    assert p.returncode == 0, p.stderr[-3000:]

    a = json.load(open(os.path.join(clean, "manifest.json")))["stages"]
    b = json.load(open(os.path.join(killed, "manifest.json")))["stages"]
    assert list(a) == list(b)
    # what the stages made (summaries, metrics and warm_state.json also hold timings or paths)
    made = {"records", "warmup", "probe", "scores", "pairs", "model", "answers"}
    compared = 0
    for key in a:
        assert b[key]["status"] == "done" and b[key]["attempts"] >= 1
        for name in made & set(a[key]["outputs"]):
            oa, ob = a[key]["outputs"][name], b[key]["outputs"][name]
            if key.endswith("synthesize_train"):  # rows name their teacher, a path inside each run dir
                ra, rb = (_jsonl(os.path.join(run, o["path"])) for run, o in ((clean, oa), (killed, ob)))
                assert [{**r, "teacher": None} for r in ra] == [{**r, "teacher": None} for r in rb], key
            else:
                assert oa["sha256"] == ob["sha256"], (key, name)
            compared += 1
    assert compared >= 9
    assert max(r["attempts"] for r in b.values()) > 1
    for name in ("synthesize/records.jsonl", "influence/scores.jsonl", "preferences/pairs.jsonl"):
        rows = _jsonl(os.path.join(killed, "iter1", "montessori", name))
        assert len({json.dumps(r.get("id", r), sort_keys=True) for r in rows}) == len(rows), name


def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_checkpoint, small_sets, tmp_path):
    from montessori_jax.cli import main

    model, _ = tiny_checkpoint
    ref, ev, pool = small_sets
    base = tiny_overrides(model, ref, ev, pool, arm="montessori", iterations=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["run.bogus=1"], "unknown key 'run.bogus'"),
        ([f"student.path={tmp_path / 'nope'}"], "student.path"),
        ([f"synthesis.seed_pool={empty}"], str(empty)),
        ([f"eval.data={ref}"], "repeat"),
    ]
    for extra, message in cases:
        run_dir = tmp_path / "r"
        run_dir.mkdir(exist_ok=True)
        keep = run_dir / "notes.txt"
        keep.write_text("mine")
        code = main(["run", "--run-dir", str(run_dir), *base, *extra])
        assert code == 2, extra
        assert keep.read_text() == "mine" and os.listdir(run_dir) == ["notes.txt"], extra
    # the messages, one line each
    for extra, message in cases:
        with pytest.raises(Exception, match=message.replace("(", r"\(")):
            cfg = load_config(Config, None, base + extra)
            pipeline.preflight(cfg)
