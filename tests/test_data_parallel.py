"""Every stage's work split over the mesh's ``data`` axis: on a data 2 x fsdp 2 x tensor 2 mesh
(8 fake CPU devices) the results equal one device's, and the rows really are split; then the
``score`` command as a 2-process cluster equals one process."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from montessori_jax.core import model as M
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
