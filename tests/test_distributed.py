"""A real 2-process JAX cluster on loopback: placement of a global batch and reading it back."""

import pytest

from montessori_jax.core import distributed
from montessori_jax.errors import UserError
from multiproc import run_cluster

CHECK = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from montessori_jax.core import distributed, sharding
assert distributed.initialize()
mesh = sharding.mesh_from_config(2, -1, 1)
x = np.arange(16, dtype=np.float32).reshape(8, 2)
a = sharding.put({"x": x}, {"x": NamedSharding(mesh, P(("data", "fsdp"), None))})["x"]
assert not a.is_fully_addressable
y = sharding.to_host(jax.jit(lambda v: v * 2)(a))
r = sharding.to_host(jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, P()))(a))
distributed.barrier("end")
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), distributed.is_writer(),
      np.array_equal(y, 2 * x), float(r))
"""


def test_two_processes_put_and_gather():
    results = run_cluster(["-c", CHECK], n=2, devices=2, timeout=180)
    lines = []
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
        lines += [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert sorted(lines) == [["0", "2", "4", "True", "True", "120.0"], ["1", "2", "4", "False", "True", "120.0"]]


def test_cluster_env_errors(monkeypatch):
    monkeypatch.delenv(distributed.ENV_COORDINATOR, raising=False)
    assert distributed.cluster_from_env() is None
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES, raising=False)
    with pytest.raises(UserError, match="MONTESSORI_NUM_PROCESSES"):
        distributed.cluster_from_env()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    with pytest.raises(UserError, match="need 0 <= id < processes"):
        distributed.cluster_from_env()
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "1")
    assert distributed.cluster_from_env()["num_processes"] == 2
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "0")
    assert distributed.cluster_from_env() is None
