"""Sharding by name on 8 fake CPU devices: the same numbers as one device."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from flax import nnx

from montessori_jax.core import batching
from montessori_jax.core import model as M
from montessori_jax.core import sharding as S
from montessori_jax.core import weights
from montessori_jax.errors import ConfigError

CFG = M.LlamaConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=96)


def _forward(graphdef):
    @jax.jit
    def fwd(state, tokens, positions, segment_ids):
        return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

    return fwd


def _batch(B=8, T=24):
    rng = np.random.RandomState(0)
    seg = np.ones((B, T), np.int32)
    seg[1, 20:] = 0
    seg[5, 10:] = 0
    return {"tokens": rng.randint(0, 128, (B, T)).astype(np.int32),
            "positions": batching.segment_positions(seg),
            "segment_ids": seg}


def test_eight_devices_available():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2), (1, 8, 1)])
def test_sharded_forward_equals_single_device(shape):
    graphdef, state = nnx.split(M.create(CFG, seed=0))
    batch = _batch()
    fwd = _forward(graphdef)
    ref = np.asarray(fwd(state, **batch))
    mesh = S.mesh_from_config(*shape)
    placed = jax.device_put(state, S.state_shardings(state, mesh))
    wq = placed["wq"].get_value()
    assert len(wq.sharding.device_set) == 8
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    with jax.set_mesh(mesh):
        out = fwd(placed, **S.put(batch, {k: rows for k in batch}))
    assert np.abs(np.asarray(out) - ref).max() <= 1e-5


def test_rules_map_logical_names_to_mesh_axes():
    mesh = S.mesh_from_config(1, 4, 2)
    spec = S.spec_for(("layers", "embed", "heads", "head_dim"), (2, 64, 8, 8), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # 9 heads do not split over tensor=2: replicated on that axis rather than an error
    spec = S.spec_for(("layers", "embed", "heads", "head_dim"), (2, 64, 9, 8), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)


def test_rule_collision_and_bad_rule_are_errors():
    mesh = S.mesh_from_config(1, 4, 2)
    rules = S.merge_rules({"vocab": "fsdp"})
    with pytest.raises(ConfigError, match="embed.*mesh axis 'fsdp' is used by two dimensions"):
        S.spec_for(("vocab", "embed"), (128, 64), mesh, rules, what="embed")
    with pytest.raises(ConfigError, match="mesh.rules.embed: 'model' is not a mesh axis"):
        S.merge_rules({"embed": "model"})


def test_mesh_sizes_must_fit_devices():
    with pytest.raises(ConfigError, match="3 x fsdp=1 x tensor=1 != 8 devices"):
        S.mesh_from_config(3, 1, 1)
    assert S.mesh_from_config(2, -1, 2).shape["fsdp"] == 2


def test_load_places_each_param_by_name(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    mesh = S.mesh_from_config(1, 4, 2)
    sharded = weights.load_model(folder, mesh=mesh)
    plain = weights.load_model(folder)
    up = nnx.state(sharded)["w_up"].get_value()
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 64 // 4, 96 // 2)
    for name in ("embed", "wq", "w_down", "lm_head"):
        np.testing.assert_array_equal(np.asarray(nnx.state(sharded)[name].get_value()),
                                      np.asarray(nnx.state(plain)[name].get_value()))
