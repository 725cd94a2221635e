"""Every stage's work split over the mesh's ``data`` axis: on a data 2 x fsdp 2 x tensor 2 mesh
(8 fake CPU devices) the results equal one device's, and the rows really are split; then the
``score`` command as a 2-process cluster equals one process."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from montessori_jax.core import sharding as S
from montessori_jax.core import text, weights
from montessori_jax.kernels.scorer import Scorer
from montessori_jax.kernels.sampler import Sampler, SamplingParams
from multiproc import run_cluster

SPLIT = (2, 2, 2)  # data x fsdp x tensor
ONE = (1, 1, 1)


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return S.mesh_from_config(*shape, devices=devices)


@pytest.fixture
def placed_rows(monkeypatch):
    """Record every array ``sharding.put_rows`` places (to check the rows are split)."""
    seen = []
    put_rows = S.put_rows

    def spy(tree, mesh, axis=0):
        out = put_rows(tree, mesh, axis)
        seen.extend((a, axis) for a in jax.tree.leaves(out) if isinstance(a, jax.Array) and a.ndim)
        return out

    monkeypatch.setattr(S, "put_rows", spy)
    return seen


def _assert_split(seen):
    assert seen, "nothing was placed with put_rows"
    for a, axis in seen:
        assert a.sharding.spec[axis] == "data", a.sharding.spec
        rows = a.shape[axis]
        assert a.addressable_shards[0].data.shape[axis] == rows // 2


def _load(folder, shape):
    mesh = _mesh(shape)
    with jax.set_mesh(mesh):
        return weights.load_model(folder, mesh=mesh), mesh


def _examples(tok, n=7):
    texts = ["the cat sat on the mat", "a dog ran", "the sun is warm today and the dog ran in the park",
             "on the mat", "the park", "warm sun", "a cat and a dog sat in the sun on the mat"]
    out = []
    for t in (texts * 2)[:n]:
        ids = np.asarray(text.encode_text(tok, t), np.int32)
        mask = np.ones(len(ids), bool)
        mask[0] = False
        out.append(text.Example(tokens=ids, loss_mask=mask))
    return out


def test_put_rows_and_round_rows():
    mesh = _mesh(SPLIT)
    assert S.round_rows(5, mesh) == 6 and S.round_rows(4, mesh) == 4 and S.round_rows(5, None) == 5
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    a = S.put_rows({"x": x}, mesh)["x"]
    assert a.sharding.spec == P("data", None)
    np.testing.assert_array_equal(S.to_host(a), x)
    b = S.put_rows(x.reshape(2, 2, 6), mesh, axis=1)
    assert b.sharding.spec == P(None, "data", None)
    with pytest.raises(ValueError, match="3 rows do not split over data=2"):
        S.put_rows(x[:3], mesh)
    assert S.mesh_of({"x": a}) is mesh and S.mesh_of({"x": x}) is None


def test_parse_mesh():
    assert S.parse_mesh("2,-1,1").data == 2
    with pytest.raises(Exception, match=r"--mesh='2,2': expected DATA,FSDP,TENSOR"):
        S.parse_mesh("2,2")


def test_score_rows_split_equal_one_device(tiny_checkpoint, placed_rows):
    folder, _ = tiny_checkpoint
    tok = text.load_tokenizer(folder)
    examples = _examples(tok)
    one, _ = _load(folder, ONE)
    s1, c1 = Scorer.of(one).nll_sums(examples, batch_size=3, pad_id=1)
    assert not placed_rows or all(a.sharding.mesh.shape["data"] == 1 for a, _ in placed_rows)
    placed_rows.clear()
    split, _ = _load(folder, SPLIT)
    s8, c8 = Scorer.of(split).nll_sums(examples, batch_size=3, pad_id=1)  # 3 rows: rounded up to 4
    _assert_split(placed_rows)
    np.testing.assert_array_equal(c1, c8)
    np.testing.assert_allclose(s1 / c1, s8 / c8, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_split_equals_one_device(tiny_checkpoint, placed_rows, temperature):
    folder, _ = tiny_checkpoint
    tok = text.load_tokenizer(folder)
    prompts = [text.encode_text(tok, t).tolist() for t in ["the cat", "a dog ran in", "the sun is"]]
    params = SamplingParams(temperature=temperature, max_new_tokens=6, n=2, seed=3)
    one, _ = _load(folder, ONE)
    ref = Sampler(one, pad_id=1).generate(prompts, params, stop_ids=[1], batch_size=4)
    placed_rows.clear()
    split, _ = _load(folder, SPLIT)
    sampler = Sampler(split, pad_id=1)
    out = sampler.generate(prompts, params, stop_ids=[1], batch_size=4)
    _assert_split(placed_rows)
    assert [[s.tokens for s in row] for row in out] == [[s.tokens for s in row] for row in ref]
    # the decode state stays split over data: the compiled decode's KV cache input is
    decode = next(v for k, v in sampler.programs.items() if k[0] == "decode")
    cache_k = decode.input_shardings[0][1]["cache"]["k"]
    assert cache_k.spec[1] == "data", cache_k.spec


def test_score_command_two_processes(tiny_checkpoint, tmp_path):
    """`montessori score` as a cluster of 2 processes x 2 devices (data=2 x fsdp=2): the same
    rows as one process on one device, written once (by process 0)."""
    folder, _ = tiny_checkpoint
    rows = [{"id": i, "text": t} for i, t in enumerate(
        ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "the dog sat",
         "a cat ran in the sun on the mat", "warm"])]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["-m", "montessori_jax.cli", "score", "--model", folder, "--input", str(inp), "--batch-size", "3"]
    one = run_cluster(argv + ["--out", str(tmp_path / "one.jsonl"), "--mesh", "1,1,1"], n=1, devices=1, timeout=120)
    assert one[0].returncode == 0, one[0].stderr[-2000:]
    two = run_cluster(argv + ["--out", str(tmp_path / "two.jsonl"), "--mesh", "2,2,1"], n=2, devices=2, timeout=120)
    for r in two:
        assert r.returncode == 0, r.stderr[-3000:]
    a = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["id"] for r in a] == [r["id"] for r in b] == list(range(6))
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    np.testing.assert_allclose([r["nll"] for r in a], [r["nll"] for r in b], rtol=0, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "one.jsonl", "two.jsonl"]  # no stray temporary
    assert "scored 6 rows" in two[0].stdout


# --- the stages, each run on one device and on data 2 x fsdp 2 x tensor 2 --------------------

WORDS = "the cat sat on the mat a dog ran in the park sun is warm today".split()


@pytest.fixture
def small_meshes(monkeypatch):
    """``mesh.*`` sizes that do not take every device build a mesh of the first ones (so
    ``mesh.data=1 mesh.fsdp=1 mesh.tensor=1`` is one device among the 8)."""
    make = S.mesh_from_config

    def some_devices(data=1, fsdp=-1, tensor=1, devices=None):
        if devices is None and -1 not in (data, fsdp, tensor):
            devices = jax.devices()[: data * fsdp * tensor]
        return make(data, fsdp, tensor, devices)

    monkeypatch.setattr(S, "mesh_from_config", some_devices)


def _mesh_args(shape):
    return [f"mesh.{k}={v}" for k, v in zip(("data", "fsdp", "tensor"), shape)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n, seed):
    rng = np.random.RandomState(seed)
    return [{"id": f"p{seed}-{i}", "seed_prompt": f"prompt {i % 3}",
             "instruction": " ".join(rng.choice(WORDS, rng.randint(2, 8))),
             "response": " ".join(rng.choice(WORDS, rng.randint(2, 14)))} for i in range(n)]


def _jsonl(path):
    return [json.loads(x) for x in open(path)]


@pytest.fixture(scope="module")
def warm_student(tiny_checkpoint, tmp_path_factory):
    from montessori_jax.config import Config, load_config
    from montessori_jax.stages.sft import run_sft

    folder, _ = tiny_checkpoint
    d = tmp_path_factory.mktemp("dp_warm")
    data = _write(d / "warmup.jsonl", _rows(8, 0))
    cfg = load_config(Config, None, [f"student.path={folder}", f"sft.data={data}", "sft.batch_size=4",
                                     "sft.export=false", "sft.optim.lr=1e-3", "sft.optim.warmup_ratio=1.0",
                                     "sft.optim.stable_ratio=0.0", "sft.optim.decay_ratio=0.0"])
    run_sft(cfg, str(d / "sft"), progress=False)
    return d, str(d / "sft"), _write(d / "probe.jsonl", _rows(7, 1)), _write(d / "ref.jsonl", _rows(6, 2))


@pytest.mark.slow  # two stage runs each (about 1-2 min on this 2-core machine)
def test_influence_stage_split_equals_one_device(warm_student, small_meshes, placed_rows):
    """Exact and first-order influence: 3 probes a program, rounded up to 4 on data=2 (a dead
    probe pads), the same scores within 1e-6."""
    from montessori_jax.cli import main

    d, warm_dir, probe, ref = warm_student
    args = ["--estimator", "both", f"influence.warm_state={warm_dir}", f"influence.probe={probe}",
            f"influence.reference={ref}", "influence.batch_size=3"]
    assert main(["influence", "--out", str(d / "one"), *args, *_mesh_args(ONE)]) == 0
    placed_rows.clear()
    assert main(["influence", "--out", str(d / "split"), *args, *_mesh_args(SPLIT)]) == 0
    _assert_split(placed_rows)
    one, split = _jsonl(d / "one" / "scores.jsonl"), _jsonl(d / "split" / "scores.jsonl")
    assert [r["id"] for r in one] == [r["id"] for r in split] and len(one) == 7
    for key in ("influence", "influence_first_order"):
        np.testing.assert_allclose([r[key] for r in split], [r[key] for r in one], rtol=0, atol=1e-6)


@pytest.mark.slow  # two stage runs each (about 1-2 min on this 2-core machine)
def test_sft_stage_split_equals_one_device(tiny_checkpoint, tmp_path, small_meshes):
    from montessori_jax.cli import main

    folder, _ = tiny_checkpoint
    data = _write(tmp_path / "train.jsonl", _rows(8, 3))
    args = [f"student.path={folder}", f"sft.data={data}", "sft.batch_size=4", "sft.epochs=2", "sft.export=false",
            "sft.optim.lr=1e-3", "sft.eval_fraction=0.25", "sft.eval_every=1"]
    assert main(["sft", "--out", str(tmp_path / "one"), *args, *_mesh_args(ONE)]) == 0
    assert main(["sft", "--out", str(tmp_path / "split"), *args, *_mesh_args(SPLIT)]) == 0
    one, split = _jsonl(tmp_path / "one" / "metrics.jsonl"), _jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [sorted(r) for r in one] == [sorted(r) for r in split]
    for a, b in zip(one, split):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a, b)


@pytest.mark.slow  # two stage runs each (about 1-2 min on this 2-core machine)
def test_dpo_stage_split_equals_one_device(tiny_checkpoint, tmp_path, small_meshes):
    from montessori_jax.cli import main

    folder, _ = tiny_checkpoint
    rng = np.random.RandomState(0)

    def s(lo, hi):
        return " ".join(rng.choice(WORDS, rng.randint(lo, hi)))

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    _write(pairs / "pairs.jsonl", [{"prompt": s(4, 12), "chosen": s(2, 10), "rejected": s(2, 10),
                                    "chosen_id": f"c{i}", "rejected_id": f"r{i}"} for i in range(8)])
    args = [f"teacher.path={folder}", f"dpo.pairs={pairs}", "dpo.optim.lr=1e-3", "dpo.batch_size=4",
            "dpo.epochs=1", "dpo.max_prompt_len=16", "dpo.max_len=48"]
    assert main(["dpo", "--out", str(tmp_path / "one"), *args, *_mesh_args(ONE)]) == 0
    assert main(["dpo", "--out", str(tmp_path / "split"), *args, *_mesh_args(SPLIT)]) == 0
    one, split = _jsonl(tmp_path / "one" / "metrics.jsonl"), _jsonl(tmp_path / "split" / "metrics.jsonl")
    assert len(one) == len(split) >= 2
    for a, b in zip(one, split):
        for key in ("loss", "rewards/margin", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
