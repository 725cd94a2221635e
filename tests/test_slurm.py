"""launch/slurm.sbatch on a real, local Slurm: munged, slurmctld and slurmd (Debian's slurm-wlm)
started in a temporary folder for this one machine, jobs of 2 tasks x 2 fake CPU devices, then
every daemon stopped. Slow (minutes); skipped where Slurm is not installed or not root.

The jobs run what works across processes today: the cluster itself and `montessori score`.
(`montessori run` across processes waits on the stages' read-back of sharded results.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from multiproc import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "launch", "slurm.sbatch")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(shutil.which(d) is None for d in DAEMONS),
                       reason="Slurm is not installed (as root: apt-get install slurmctld slurmd slurm-client munge)"),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="slurmd starts jobs as their user, so the local Slurm runs as root"),
]

CONF = """ClusterName=montessori-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
PlugStackConfig={dir}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _stop(pid_file: str) -> None:
    try:
        pid = int(open(pid_file).read().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def local_slurm():
    """A one-node Slurm (this machine, all its CPUs) in a temporary folder: its environment
    (SLURM_CONF) for the clients; munged, slurmctld and slurmd are stopped at the end."""
    folder = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")  # short: a unix socket path lives here
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(folder, sub))
    key = os.path.join(folder, "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    host = socket.gethostname().split(".")[0]
    conf = os.path.join(folder, "slurm.conf")
    with open(conf, "w") as f:
        f.write(CONF.format(host=host, ctld_port=free_port(), d_port=free_port(), dir=folder, cpus=os.cpu_count()))
    open(os.path.join(folder, "plugstack.conf"), "w").close()
    env = {**os.environ, "SLURM_CONF": conf}
    pids = [os.path.join(folder, n) for n in ("slurmd.pid", "slurmctld.pid", "munged.pid")]
    try:
        subprocess.run(["munged", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
                        f"--log-file={folder}/munged.log", f"--pid-file={folder}/munged.pid",
                        f"--seed-file={folder}/munged.seed"], check=True, capture_output=True, timeout=30)
        subprocess.run(["slurmctld"], env=env, check=True, capture_output=True, timeout=60)
        subprocess.run(["slurmd"], env=env, check=True, capture_output=True, timeout=60)
        deadline = time.time() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            if time.time() > deadline:
                logs = "".join(open(os.path.join(folder, n)).read()[-1500:] for n in ("slurmctld.log", "slurmd.log")
                               if os.path.exists(os.path.join(folder, n)))
                pytest.fail(f"the local Slurm node is {state!r}, not idle, after 60 s:\n{logs}")
            time.sleep(0.5)
        yield {"env": env, "folder": folder}
    finally:
        for pid_file in pids:
            _stop(pid_file)
        shutil.rmtree(folder, ignore_errors=True)


def _job_env(local_slurm, tmp_path) -> dict:
    env = {k: v for k, v in local_slurm["env"].items() if not k.startswith(("MONTESSORI_", "SLURM_JOB", "DRY_RUN"))}
    env.update({
        "MONTESSORI_VENV": sys.prefix,  # the venv running the tests: nothing is installed
        "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    return env


def _submit(env, out: str, args: list[str]) -> str:
    p = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=2", f"--output={out}", SBATCH, *args],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _job(env, job: str) -> dict:
    line = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", line))


def _wait(env, job: str, until, timeout: float, out: str) -> dict:
    deadline = time.time() + timeout
    while True:
        info = _job(env, job)
        if until(info):
            return info
        if time.time() > deadline:
            log = open(out).read()[-3000:] if os.path.exists(out) else ""
            pytest.fail(f"job {job}: {info.get('JobState')} after {timeout} s\n{log}")
        time.sleep(1)


CHECK = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from montessori_jax.core import distributed, sharding
assert distributed.initialize()
mesh = sharding.mesh_from_config(-1, 1, 1)
x = np.arange(8, dtype=np.float32)
total = sharding.to_host(jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, P()))(
    sharding.put({"x": x}, {"x": NamedSharding(mesh, P("data"))})["x"]))
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), float(total), flush=True)
"""


def test_sbatch_two_tasks_join_one_cluster_and_score(local_slurm, tiny_checkpoint, tmp_path):
    """2 tasks of one job form one JAX cluster of 4 devices, then `montessori score` runs in it
    and gives the single-process NLLs."""
    model, _ = tiny_checkpoint
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                            enumerate(["the cat sat on the mat", "a dog ran in the park", "the sun is warm today"])))
    (tmp_path / "check.py").write_text(CHECK)
    env = _job_env(local_slurm, tmp_path)
    out = str(tmp_path / "job.out")
    start = time.time()
    job = _submit(env, out, ["--", "bash", "-c", f"python {tmp_path}/check.py && montessori score --model {model} "
                             f"--input {rows} --out {tmp_path}/cluster.jsonl"])
    info = _wait(env, job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600, out)
    log = open(out).read()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    print(f"job {job}: {time.time() - start:.0f} s")
    assert re.search(r"2 task\(s\) on 1 node\(s\), coordinator \S+:\d+", log)
    results = sorted(line.split()[1:] for line in log.splitlines() if line.startswith("RESULT"))
    assert results == [["0", "2", "4", "28.0"], ["1", "2", "4", "28.0"]]

    single = subprocess.run([sys.executable, "-m", "montessori_jax.cli", "score", "--model", model, "--input",
                             str(rows), "--out", str(tmp_path / "single.jsonl")],
                            env={k: v for k, v in env.items() if k != "SLURM_CONF"}, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    a = [json.loads(line) for line in open(tmp_path / "single.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "cluster.jsonl")]
    assert [(r["id"], r["tokens"]) for r in a] == [(r["id"], r["tokens"]) for r in b]
    assert all(abs(x["nll"] - y["nll"]) <= 1e-5 for x, y in zip(a, b))


def test_sbatch_requeued_on_usr1_runs_again(local_slurm, tiny_checkpoint, tmp_path):
    """The batch script gets USR1 (as 120 s before the time limit), requeues the job, and the
    restarted job (the same id) runs the same command again as one cluster. The command: the
    cluster check, `montessori score`, then, on the first start only, a wait for the signal."""
    model, _ = tiny_checkpoint
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": 0, "text": "the cat sat on the mat"}) + "\n")
    (tmp_path / "check.py").write_text(CHECK)
    env = _job_env(local_slurm, tmp_path)
    out = str(tmp_path / "job.out")
    start = time.time()
    script = (f"python {tmp_path}/check.py && montessori score --model {model} --input {rows} "
              f"--out {tmp_path}/score.jsonl && touch {tmp_path}/scored-$SLURM_RESTART_COUNT-$SLURM_PROCID && "
              "if [ \"${SLURM_RESTART_COUNT:-0}\" = 0 ]; then sleep 600; fi")
    job = _submit(env, out, ["--", "bash", "-c", script])
    _wait(env, job, lambda i: (tmp_path / "scored--1").exists() and (tmp_path / "scored--0").exists()
          or i.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"), 600, out)
    assert _job(env, job).get("JobState") == "RUNNING", open(out).read()[-3000:]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=60)
    _wait(env, job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", 120, out)
    # a requeued job waits a while before it may start again; let it start now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True, timeout=60)
    info = _wait(env, job, lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600, out)
    log = open(out).read()
    print(f"job {job}: {time.time() - start:.0f} s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "signal received, requeueing" in log and "(restart 1)" in log
    assert sorted(line.split()[1:] for line in log.splitlines() if line.startswith("RESULT")) == \
        [["0", "2", "4", "28.0"]] * 2 + [["1", "2", "4", "28.0"]] * 2
    assert {p.name for p in tmp_path.glob("scored-*")} == {"scored--0", "scored--1", "scored-1-0", "scored-1-1"}
