"""`montessori influence` as a stage: outputs, resume after a kill, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from montessori_jax.cli import main
from montessori_jax.config import Config, load_config
from montessori_jax.errors import UserError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


WORDS = "the cat sat on the mat a dog ran in the park sun is warm today".split()


def _rows(n, seed):
    rng = np.random.RandomState(seed)
    return [{"id": f"p{seed}-{i}", "seed_prompt": f"prompt {i % 3}",
             "instruction": " ".join(rng.choice(WORDS, rng.randint(2, 8))),
             "response": " ".join(rng.choice(WORDS, rng.randint(2, 14)))} for i in range(n)]


@pytest.fixture(scope="module")
def warm(tiny_checkpoint, tmp_path_factory):
    from montessori_jax.stages.sft import run_sft

    folder, _ = tiny_checkpoint
    d = tmp_path_factory.mktemp("inf_stage")
    data = _write(d / "warmup.jsonl", _rows(8, 0))
    cfg = load_config(Config, None, [f"student.path={folder}", f"sft.data={data}", "sft.batch_size=4",
                                     "sft.export=false", "sft.optim.lr=1e-3", "sft.optim.warmup_ratio=1.0",
                                     "sft.optim.stable_ratio=0.0", "sft.optim.decay_ratio=0.0"])
    run_sft(cfg, str(d / "sft"), progress=False)
    probe = _write(d / "probe.jsonl", _rows(10, 1))
    ref = _write(d / "ref.jsonl", _rows(6, 2))
    return d, str(d / "sft"), probe, ref


def _args(warm_dir, probe, ref, *extra):
    return [f"influence.warm_state={warm_dir}", f"influence.probe={probe}", f"influence.reference={ref}",
            "influence.batch_size=2", *extra]


def _scores(path):
    return {r["id"]: r for r in map(json.loads, open(path))}


def test_cli_outputs_and_summary(warm, capsys):
    d, warm_dir, probe, ref = warm
    out = d / "both"
    assert main(["influence", "--out", str(out), "--estimator", "both", *_args(warm_dir, probe, ref)]) == 0
    assert "first-order vs exact: Spearman" in capsys.readouterr().out
    rows = _scores(out / "scores.jsonl")
    assert len(rows) == 10 and rows["p1-3"]["seed_prompt"] == "prompt 0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["positive"] + summary["negative"] + summary["zero"] == 10
    assert summary["lr"] == pytest.approx(1e-3)  # the warm-up's last lr (all warmup: the peak)
    assert summary["agreement"]["n"] == 10
    infl = np.array([r["influence"] for r in rows.values()])
    assert np.all(np.abs(infl) > 0)
    assert (out / "influence_hist.png").stat().st_size > 1000
    for r in rows.values():
        assert r["ref_loss_after"] == pytest.approx(summary["baseline_ref_loss"] - r["influence"], abs=1e-6)


def test_profile_writes_a_trace_and_prints_the_programs_costs(warm, capsys):
    d, warm_dir, probe, ref = warm
    trace_dir = d / "trace"
    assert main(["influence", "--out", str(d / "profiled"), "--profile", str(trace_dir),
                 "--estimator", "both", *_args(warm_dir, probe, ref)]) == 0
    traces = [os.path.join(root, f) for root, _, files in os.walk(trace_dir) for f in files
              if f.endswith((".xplane.pb", ".trace.json.gz"))]
    assert traces and all(os.path.getsize(t) > 0 for t in traces), traces
    assert len(open(d / "profiled" / "scores.jsonl").read().splitlines()) == 10
    out = capsys.readouterr().out
    for name in ("exact", "first_order"):
        assert f"{name}: XLA cost analysis per example: " in out and " bytes accessed" in out
        assert f"{name}: matmul FLOPs per example" in out
        assert f"{name}: steady state" in out and " FLOP/s; MFU unknown (no peak for this device)" in out
    assert "phases, one example each as its own program: example_gradient" in out
    p = json.loads((trace_dir / "profile.json").read_text())
    assert p["examples_per_call"] == 2 and p["peak_bf16_flops"] is None
    for r in p["programs"].values():
        assert r["xla_flops_per_example"] > 0 and r["xla_bytes_accessed_per_example"] > 0
        assert r["seconds_per_example"] > 0 and r["achieved_flops_per_s"] > 0 and r["mfu"] is None
    # the exact program adds a pass over D_ref per example to the first-order one's step
    assert p["programs"]["exact"]["matmul_flops_per_example"] > p["programs"]["first_order"]["matmul_flops_per_example"]
    assert set(p["phases_one_example"]) == {"example_gradient", "adamw_update", "reference_pass"}
    # one trace per program, and its costliest ops named with what the HLO says they are
    for name in ("exact", "first_order"):
        assert any(f.endswith(".trace.json.gz") for _, _, fs in os.walk(trace_dir / name) for f in fs)
        top = p["programs"][name]["top_ops"]
        assert top and all(o["seconds"] > 0 and o["shape"] for o in top)
        assert sorted((o["seconds"] for o in top), reverse=True) == [o["seconds"] for o in top]
    assert "exact: the ops that took the most time in its trace" in out


def test_resume_after_kill_gives_the_same_scores(warm):
    d, warm_dir, probe, ref = warm
    full = d / "full"
    assert main(["influence", "--out", str(full), *_args(warm_dir, probe, ref)]) == 0

    cut = d / "cut"
    env = dict(os.environ)  # the same 8 devices and mesh as the runs in this process
    cmd = [sys.executable, "-m", "montessori_jax.cli", "influence", "--out", str(cut), *_args(warm_dir, probe, ref)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    scores = cut / "scores.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (scores.exists() and scores.read_text().count("\n") >= 2):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = scores.read_text().count("\n")
    assert 2 <= n_before < 10, "killed part way"
    with open(scores, "a") as f:
        f.write('{"id": "p1-9", "influ')  # a line cut by the kill
    assert main(["influence", "--out", str(cut), *_args(warm_dir, probe, ref)]) == 0
    a, b = _scores(full / "scores.jsonl"), _scores(scores)
    assert len(open(scores).read().splitlines()) == 10  # nothing lost or duplicated
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["influence"] == pytest.approx(b[k]["influence"], abs=1e-9), k


def test_missing_warm_state_is_named(tmp_path):
    cfg = load_config(Config, None, [f"influence.warm_state={tmp_path}", f"influence.probe={tmp_path}/p.jsonl"])
    from montessori_jax.stages.influence import run_influence

    with pytest.raises(UserError, match="warm_state.json: no warm state"):
        run_influence(cfg, str(tmp_path / "out"))


def test_rerun_with_other_settings_names_the_changed_keys(warm, capsys):
    """A folder's scores come from one set of settings: a rerun with another lr, estimator or
    clipping is a one-line error naming them, and nothing is written; batch sizes may change."""
    d, warm_dir, probe, ref = warm
    out = d / "fingerprinted"
    assert main(["influence", "--out", str(out), *_args(warm_dir, probe, ref)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["lr"] == pytest.approx(1e-3) and settings["grad_clip"] is None
    assert settings["estimator"] == "exact" and len(settings["warm_state"]) == 64
    before = (out / "scores.jsonl").read_text()
    capsys.readouterr()

    def error(*argv):
        assert main(["influence", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line
        return err

    assert "other settings (changed: lr); use a new --out" in error(*_args(warm_dir, probe, ref, "influence.lr=5e-4"))
    assert "(changed: estimator)" in error("--estimator", "both", *_args(warm_dir, probe, ref))
    assert "(changed: grad_clip, reference)" in error(*_args(warm_dir, probe, probe, "influence.grad_clip=1.0"))
    assert (out / "scores.jsonl").read_text() == before
    assert json.loads((out / "settings.json").read_text()) == settings
    # batch sizes and memory settings do not change scores: the rerun resumes (nothing left to do)
    assert main(["influence", "--out", str(out), *_args(warm_dir, probe, ref, "influence.batch_size=4",
                                                         "influence.ref_batch_size=3")]) == 0
    assert (out / "scores.jsonl").read_text() == before


def test_scores_without_settings_are_not_resumed(warm, tmp_path):
    from montessori_jax.stages.influence import run_influence

    d, warm_dir, probe, ref = warm
    (tmp_path / "scores.jsonl").write_text('{"id": "p1-0", "influence": 0.1}\n')
    cfg = load_config(Config, None, _args(warm_dir, probe, ref))
    with pytest.raises(UserError, match="holds 1 influence scores but no settings.json"):
        run_influence(cfg, str(tmp_path), progress=False)


def test_kept_reference_serves_a_second_scoring_then_is_released(warm, tmp_path, monkeypatch):
    """The teacher shift scores other probes on the same warm student: L_ref's baseline and
    gradient kept from the first scoring (on the host) give the same scores as computing them."""
    from montessori_jax.kernels import influence
    from montessori_jax.stages import influence as influence_stage
    from montessori_jax.stages.influence import run_influence

    d, warm_dir, probe, ref = warm
    other = _write(tmp_path / "other.jsonl", _rows(4, 7))

    def cfg(p):
        return load_config(Config, None, _args(warm_dir, p, ref, "influence.estimator=first_order"))

    fresh = run_influence(cfg(other), str(tmp_path / "fresh"), progress=False)
    run_influence(cfg(probe), str(tmp_path / "first"), progress=False, keep_reference=True)
    assert influence_stage._REF_CACHE

    def refuse(*a, **k):
        raise AssertionError("grad L_ref computed again")

    monkeypatch.setattr(influence, "make_ref_grad", refuse)
    monkeypatch.setattr(influence, "make_baseline", refuse)
    again = run_influence(cfg(other), str(tmp_path / "again"), progress=False)
    assert again["baseline_ref_loss"] == fresh["baseline_ref_loss"]
    assert _scores(tmp_path / "again" / "scores.jsonl") == _scores(tmp_path / "fresh" / "scores.jsonl")
    assert not influence_stage._REF_CACHE  # used without keep_reference: not kept for a third
    with pytest.raises(AssertionError, match="computed again"):
        run_influence(cfg(other), str(tmp_path / "third"), progress=False)


def test_every_length_bucket_is_compiled_before_the_first_chunk(warm, tmp_path, monkeypatch):
    """Probes sorted by length reach a longer bucket mid-run; its programs were compiled up front,
    so nothing is traced between the first and the last chunk."""
    import jax

    from montessori_jax import faults

    d, warm_dir, _, ref = warm
    rows = _rows(4, 7)
    for r in rows[2:]:  # two probes well past the first length bucket (64)
        r["response"] = " ".join(WORDS * 6)
    probe = _write(tmp_path / "two_buckets.jsonl", rows)
    from jax._src import monitoring

    events = []

    def on_event(name, *_a, **_k):
        if name == "/jax/core/compile/jaxpr_trace_duration":
            events.append("trace")

    real_point = faults.point
    monkeypatch.setattr(faults, "point", lambda name: (events.append(name), real_point(name))[1])
    out = tmp_path / "inf"
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        assert main(["influence", "--out", str(out), "--estimator", "both", *_args(warm_dir, probe, ref)]) == 0
    finally:
        monitoring.unregister_event_duration_listener(on_event)
    chunks = [i for i, e in enumerate(events) if e == "influence.chunk"]
    assert len(chunks) == 2
    assert "trace" not in events[chunks[0]:chunks[-1]]
    assert len(_scores(out / "scores.jsonl")) == 4
