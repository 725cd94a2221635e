"""A real 2-process JAX cluster on loopback: placement of a global batch and reading it back."""

import json
import os

import numpy as np
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
      np.array_equal(y, 2 * x), float(r), flush=True)
"""


def test_two_processes_put_and_gather():
    results = run_cluster(["-c", CHECK], n=2, devices=2, timeout=180)
    lines = []
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
        lines += [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert sorted(lines) == [["0", "2", "4", "True", "True", "120.0"], ["1", "2", "4", "False", "True", "120.0"]], \
        [(r.stdout[-1000:], r.stderr[-1000:]) for r in results]


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


def test_expand_hostlist():
    assert distributed.expand_hostlist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert distributed.expand_hostlist("gpu5") == ["gpu5"]
    assert distributed.expand_hostlist("a[8-10],b1,rack[1-2]-n[1,3]") == [
        "a8", "a9", "a10", "b1", "rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]
    with pytest.raises(UserError, match="unbalanced"):
        distributed.expand_hostlist("node[01-03")
    with pytest.raises(UserError, match="backwards"):
        distributed.expand_hostlist("node[5-3]")


SLURM = {"SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_JOB_NODELIST": "gpu[03-04]",
         "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}


def test_slurm_cluster_one_task_per_gpu():
    c = distributed.slurm_cluster(SLURM)
    assert c == {"coordinator": f"gpu03:{50000 + 123456 % 10000}", "num_processes": 8, "process_id": 5,
                 "timeout": 300, "cuda_visible_devices": "1"}
    # Slurm gave the node a GPU list: the task takes its LOCALID-th entry
    c = distributed.slurm_cluster({**SLURM, "CUDA_VISIBLE_DEVICES": "4,5,6,7", "MONTESSORI_PORT": "4321",
                                   "MONTESSORI_INIT_TIMEOUT": "7"})
    assert (c["coordinator"], c["cuda_visible_devices"], c["timeout"]) == ("gpu03:4321", "5", 7)
    # srun bound one GPU to each task already: left alone
    assert distributed.slurm_cluster({**SLURM, "CUDA_VISIBLE_DEVICES": "6"})["cuda_visible_devices"] is None
    with pytest.raises(UserError, match="one GPU per task"):
        distributed.slurm_cluster({**SLURM, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1"})


def test_slurm_cluster_one_task_per_node_and_outside_steps():
    per_node = {**SLURM, "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
                "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    c = distributed.slurm_cluster(per_node)
    assert (c["num_processes"], c["process_id"], c["cuda_visible_devices"]) == (2, 1, None)
    # the batch script itself (one task in its step), a single-task job, an opt-out: no cluster
    assert distributed.slurm_cluster({**SLURM, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert distributed.slurm_cluster({k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP")}
                                     | {"SLURM_NTASKS": "1"}) is None
    assert distributed.slurm_cluster({**SLURM, "MONTESSORI_SLURM": "0"}) is None
    assert distributed.slurm_cluster({}) is None
    # uneven task counts per node: "2(x3),1" gives node 3 one task
    assert distributed._tasks_on_node("2(x3),1", 3) == 1 and distributed._tasks_on_node("2(x3),1", 2) == 2


def test_processes_sharing_this_hosts_memory(monkeypatch):
    loop = {"MONTESSORI_COORDINATOR": "127.0.0.1:4000", "MONTESSORI_NUM_PROCESSES": "3", "MONTESSORI_PROCESS_ID": "1"}
    assert distributed.processes_on_this_host(loop) == 3
    assert distributed.processes_on_this_host({**loop, "MONTESSORI_COORDINATOR": "localhost:4000"}) == 3
    assert distributed.processes_on_this_host({**loop, "MONTESSORI_COORDINATOR": "node7:4000"}) == 1
    assert distributed.processes_on_this_host(SLURM) == 4  # 4(x2): four tasks on each node
    assert distributed.processes_on_this_host({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x8)"}) == 1
    assert distributed.processes_on_this_host({}) == 1
    # a CPU device's memory is the host's RAM over every device sharing it
    from montessori_jax.kernels import influence_memory

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(distributed.os, "environ", loop)
    import jax

    assert influence_memory.device_memory_bytes() == ram // (jax.local_device_count() * 3)


def test_tpu_pod_detection():
    assert distributed.is_tpu_pod({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3", "TPU_WORKER_ID": "1"})
    assert distributed.is_tpu_pod({"TPU_PROCESS_ADDRESSES": "a:8476,b:8476"})
    assert distributed.is_tpu_pod({"MEGASCALE_NUM_SLICES": "2"})
    assert not distributed.is_tpu_pod({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"})
    assert not distributed.is_tpu_pod({})
    assert distributed.is_tpu_pod({"MONTESSORI_TPU_POD": "1"})
    assert not distributed.is_tpu_pod({"MONTESSORI_TPU_POD": "0", "TPU_WORKER_HOSTNAMES": "a,b"})


def test_unreachable_coordinator_fails_in_one_line():
    """Process 1 of 2 with nothing listening: one line naming the address after the timeout
    (not JAX's C++ abort)."""
    import subprocess
    import sys
    import time

    from multiproc import cluster_env, free_port

    port = free_port()
    env = cluster_env(1, 2, port, devices=1, extra={"MONTESSORI_INIT_TIMEOUT": "5"})
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "montessori_jax.cli", "config"], env=env, capture_output=True,
                       text=True, timeout=120)
    took = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "after 5 s" in lines[0], r.stderr
    assert 5 <= took < 60


@pytest.mark.slow
def test_two_process_run_equals_one_process(tiny_checkpoint, tmp_path):
    """`montessori run` (one Montessori iteration, tiny random model) as a cluster of 2
    processes x 2 CPU devices writes what one process writes; so does a cluster run whose
    process 1 is killed mid-run (then the whole job, as a launcher does) and started again."""
    import signal
    import subprocess
    import time

    from multiproc import start_cluster
    from pipeline_helpers import write_small_sets

    model, _ = tiny_checkpoint
    sets = write_small_sets(str(tmp_path))
    helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_helpers.py")
    timings = {}
    for name, n, devices in (("one", 1, 1), ("two", 2, 2)):
        t0 = time.perf_counter()
        results = run_cluster([helper, str(tmp_path / name), model, *sets], n=n, devices=devices, timeout=900)
        timings[name] = time.perf_counter() - t0
        for r in results:
            assert r.returncode == 0, r.stderr[-3000:]
    print("wall seconds", timings)
    _assert_same_run(tmp_path, "two")

    # kill process 1 once the influence stage has started, then the rest of the job
    argv = [helper, str(tmp_path / "killed"), model, *sets]
    procs = start_cluster(argv, 2, 2, output=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 600
    while time.time() < deadline and '"iter1/montessori/influence"' not in (
            manifest.read_text() if manifest.exists() else ""):
        time.sleep(0.2)
    assert procs[1].poll() is None, "the run ended before the kill"
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    procs[0].kill()
    procs[0].wait()
    for r in run_cluster(argv, n=2, devices=2, timeout=900):
        assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(tmp_path, "killed")


def _assert_same_run(tmp_path, name2):
    name1 = "one"
    a, b = (json.load(open(tmp_path / name / "manifest.json"))["stages"] for name in (name1, name2))
    assert list(a) == list(b) and all(r["status"] == "done" for r in b.values())
    # texts (sampled and greedy) are the same bytes; numbers (scores, weights) the same within
    # the bounds: 4 devices in 2 processes sum in another order than 1 device
    hashed = {"records", "warmup", "probe", "answers"}
    for key in a:
        for out in hashed & set(a[key]["outputs"]):
            if a[key]["outputs"][out]["sha256"] == b[key]["outputs"][out]["sha256"]:
                continue
            # rows that name a model by its path in the run directory (the DPO'd teacher) differ
            # in that path only
            rows = [[json.loads(line) for line in open(os.path.join(tmp_path / name, m[key]["outputs"][out]["path"]))]
                    for name, m in ((name1, a), (name2, b))]
            for x, y in zip(*rows):
                for field in ("teacher", "model"):
                    if isinstance(x.get(field), str) and str(tmp_path) in x[field]:
                        assert x.pop(field).replace(f"/{name1}/", f"/{name2}/") == y.pop(field), (key, out, field)
            assert rows[0] == rows[1], (key, out)
        if "pairs" in a[key]["outputs"]:
            rows = [[json.loads(line) for line in open(os.path.join(tmp_path / name, m[key]["outputs"]["pairs"]["path"]))]
                    for name, m in ((name1, a), (name2, b))]
            assert len(rows[0]) == len(rows[1]) > 0
            for x, y in zip(*rows):
                assert {k for k, v in x.items() if not isinstance(v, float)} == {
                    k for k, v in y.items() if not isinstance(v, float)}
                for k, v in x.items():
                    assert (abs(v - y[k]) <= 1e-6) if isinstance(v, float) else v == y[k], (key, k, v, y[k])
        if "model" in a[key]["outputs"]:
            from safetensors.numpy import load_file

            wa, wb = (load_file(os.path.join(tmp_path / name, m[key]["outputs"]["model"]["path"], "model.safetensors"))
                      for name, m in ((name1, a), (name2, b)))
            assert wa.keys() == wb.keys()
            for k in wa:
                np.testing.assert_allclose(wa[k], wb[k], rtol=0, atol=1e-5, err_msg=f"{key} {k}")
    scores = [[json.loads(line) for line in open(tmp_path / name / "iter1/montessori/influence/scores.jsonl")]
              for name in (name1, name2)]
    assert [r["id"] for r in scores[0]] == [r["id"] for r in scores[1]]
    for x, y in zip(*scores):
        assert abs(x["influence"] - y["influence"]) <= 1e-6, (x, y)
    nll = [json.load(open(tmp_path / name / "iter1/montessori/eval/nll_student.json"))["ref_nll"] for name in (name1, name2)]
    assert abs(nll[0] - nll[1]) <= 1e-5
