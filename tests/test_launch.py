"""The launch scripts without a cluster: launch/slurm.sbatch with a fake Slurm environment (its
dry run, and its real path with a stand-in srun), launch/tpu_pod.sh with a stand-in gcloud (its
dry run, and the per-worker command run here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "launch", "slurm.sbatch")
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts are bash scripts")

# a job of 2 nodes with GPUs 4 and 5 of each (Slurm's CUDA_VISIBLE_DEVICES for the job)
SLURM_JOB = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NTASKS": "4", "SLURM_SUBMIT_DIR": REPO}


def _env(tmp_path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MONTESSORI_", "CUDA_VISIBLE", "JAX_LOCAL", "JAX_COMPILATION", "DRY_RUN", "TPU", "ZONE"))}
    env["MONTESSORI_VENV"] = str(tmp_path / "venv")  # absent: the dry run says it would be set up
    env.update(extra)
    return env


def _tasks(stdout: str) -> list[dict]:
    """The dry run's per-task blocks as {VAR: value, "command": ...}."""
    tasks = []
    for line in stdout.splitlines():
        if line.startswith("task "):
            tasks.append({})
        elif line.startswith("  ") and tasks:
            key, _, value = line.strip().partition("=") if not line.strip().startswith("command:") else \
                ("command", None, line.strip()[len("command: "):])
            tasks[-1][key] = value
    return tasks


def test_slurm_dry_run_one_task_per_gpu(tmp_path):
    env = _env(tmp_path, {**SLURM_JOB, "CUDA_VISIBLE_DEVICES": "4,5", "MONTESSORI_PORT": "12345"})
    p = subprocess.run(["bash", SBATCH, "--dry-run", "configs/default.yaml", "runs/x", "seed=1"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "4 task(s), MONTESSORI_TASKS=gpu" in p.stdout and "would be set up" in p.stdout
    assert "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=4 bash -c" in p.stdout
    tasks = _tasks(p.stdout)
    assert [t["MONTESSORI_PROCESS_ID"] for t in tasks] == ["0", "1", "2", "3"]
    assert {t["MONTESSORI_COORDINATOR"] for t in tasks} == {"gpu003:12345"}
    assert {t["MONTESSORI_NUM_PROCESSES"] for t in tasks} == {"4"}
    # each task its own GPU of its node's two, and JAX told to use the one it sees
    assert [t["CUDA_VISIBLE_DEVICES"] for t in tasks] == ["4", "5", "4", "5"]
    assert {t["JAX_LOCAL_DEVICE_IDS"] for t in tasks} == {"0"}
    assert {t["command"] for t in tasks} == {"montessori run -c configs/default.yaml --run-dir runs/x seed=1"}
    assert {t["JAX_COMPILATION_CACHE_DIR"] for t in tasks} == {"runs/x/xla_cache"}


def test_slurm_dry_run_one_task_per_node_and_any_command(tmp_path):
    env = _env(tmp_path, {**SLURM_JOB, "SLURM_GPUS_ON_NODE": "8", "MONTESSORI_TASKS": "node", "DRY_RUN": "1",
                          "MONTESSORI_CONFIG": "c.yaml", "MONTESSORI_RUN_DIR": "/shared/r"})
    p = subprocess.run(["bash", SBATCH, "dpo.beta=0.2"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--ntasks=2 --ntasks-per-node=1" in p.stdout
    tasks = _tasks(p.stdout)
    assert [t["MONTESSORI_PROCESS_ID"] for t in tasks] == ["0", "1"]
    assert {t["MONTESSORI_COORDINATOR"] for t in tasks} == {"gpu003:21234"}  # port 20000 + job id % 20000
    assert {t["JAX_LOCAL_DEVICE_IDS"] for t in tasks} == {"0,1,2,3,4,5,6,7"}  # every GPU of the node
    assert all("CUDA_VISIBLE_DEVICES" not in t for t in tasks)
    assert {t["command"] for t in tasks} == {"montessori run -c c.yaml --run-dir /shared/r dpo.beta=0.2"}

    p = subprocess.run(["bash", SBATCH, "--", "montessori", "score", "--model", "smollm2", "--input", "a b.jsonl"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert {t["command"] for t in _tasks(p.stdout)} == {r"montessori score --model smollm2 --input a\ b.jsonl"}


@pytest.mark.parametrize("extra, args, message", [
    ({"MONTESSORI_TASKS": "host"}, ["c", "r"], "MONTESSORI_TASKS=host: expected gpu or node"),
    ({"SLURM_JOB_ID": ""}, ["c", "r"], "not inside a Slurm job"),
    ({}, ["--"], "nothing after --"),
    ({}, ["c"], "usage: sbatch"),
])
def test_slurm_bad_use_is_one_line(tmp_path, extra, args, message):
    p = subprocess.run(["bash", SBATCH, "--dry-run", *args], env=_env(tmp_path, {**SLURM_JOB, **extra}),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert p.stdout == ""


def _fake_bin(folder, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_slurm_real_path_with_a_stand_in_srun(tmp_path):
    """Not a dry run: the venv is found ready (no set-up), srun's tasks run the shipped task set-up
    and then the command; here srun is a stand-in that runs its tasks one after another."""
    fake = tmp_path / "bin"
    _fake_bin(fake, "srun", 'n=1; while [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#--ntasks=};; esac; shift; done\n'
                            'for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % 2)) "$@" || exit; done\n')
    _fake_bin(tmp_path / "venv" / "bin", "montessori",
              'echo "RAN $MONTESSORI_PROCESS_ID/$MONTESSORI_NUM_PROCESSES $MONTESSORI_COORDINATOR '
              'gpu=$CUDA_VISIBLE_DEVICES args=$*"\n')
    env = _env(tmp_path, {**SLURM_JOB, "CUDA_VISIBLE_DEVICES": "0,1", "PATH": f"{fake}:{os.environ['PATH']}"})
    p = subprocess.run(["bash", SBATCH, "configs/default.yaml", str(tmp_path / "run")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "setting up" not in p.stdout
    ran = sorted(line for line in p.stdout.splitlines() if line.startswith("RAN "))
    assert ran == [f"RAN {i}/4 gpu003:21234 gpu={i % 2} args=run -c configs/default.yaml --run-dir {tmp_path}/run"
                   for i in range(4)]


def _fake_gcloud(tmp_path) -> dict:
    """A gcloud that logs its arguments (JSON, a line a call) and describes a 2-worker slice."""
    log = tmp_path / "gcloud.log"
    _fake_bin(tmp_path / "bin", "gcloud",
              f'python3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@" >> {log}\n'
              '[ "$4" != describe ] || echo "10.1.0.7;10.1.0.8"\n')
    return {"TPU": "pod1", "ZONE": "us-east5-a", "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "TMPDIR": str(tmp_path)}


def test_tpu_pod_dry_run_prints_the_gcloud_commands(tmp_path):
    env = _env(tmp_path, _fake_gcloud(tmp_path))
    p = subprocess.run(["bash", TPU_POD, "--dry-run", "configs/default.yaml", "/mnt/runs/x", "seed=1"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "gcloud.log").exists()  # nothing ran
    lines = p.stdout.splitlines()
    assert lines[0] == ("gcloud compute tpus tpu-vm describe pod1 --zone us-east5-a "
                        "--format 'value(networkEndpoints[].ipAddress)'")
    assert lines[1].startswith(f"git -C {REPO} archive --format=tar.gz")
    assert lines[2].startswith("gcloud compute tpus tpu-vm scp ") and lines[2].endswith("--worker=all")
    ssh = [line for line in lines if line.startswith("gcloud compute tpus tpu-vm ssh pod1 --zone us-east5-a "
                                                     "--worker=all --command ")]
    assert len(ssh) == 3 and len(lines) == 6
    assert 'pip install -q -e ".[tpu]" "jax[tpu]==0.10.2"' in ssh[1]
    assert "MONTESSORI_COORDINATOR=WORKER0_IP:8476" in ssh[2] and "agent-worker-number" in ssh[2]
    assert ssh[2].endswith("exec montessori run -c configs/default.yaml --run-dir /mnt/runs/x seed=1 '")

    p = subprocess.run(["bash", TPU_POD, "--dry-run", "c.yaml", "runs/x"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "give an absolute path" in p.stderr


def test_tpu_pod_runs_its_worker_command(tmp_path):
    """Not a dry run, with the stand-in gcloud: the calls it makes, then the per-worker command of
    the last one run here as worker 1 (a stand-in curl answers the metadata server)."""
    env = _env(tmp_path, {**_fake_gcloud(tmp_path), "SKIP_SETUP": "1", "MONTESSORI_REMOTE_DIR": "code"})
    override = "synthesis.preamble='Write one new task.'"
    p = subprocess.run(["bash", TPU_POD, "configs/default.yaml", "/mnt/runs/x", override], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    calls = [json.loads(line) for line in (tmp_path / "gcloud.log").read_text().splitlines()]
    assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "describe"], ["compute", "tpus", "tpu-vm", "ssh"]]
    command = calls[1][calls[1].index("--command") + 1]

    home = tmp_path / "home"
    _fake_bin(home / "code" / ".venv" / "bin", "montessori",
              'echo "RAN $MONTESSORI_PROCESS_ID/$MONTESSORI_NUM_PROCESSES $MONTESSORI_COORDINATOR $JAX_COMPILATION_CACHE_DIR"\n'
              'printf "ARG %s\\n" "$@"\n')
    _fake_bin(tmp_path / "worker_bin", "curl", 'echo 1\n')
    worker_env = {"HOME": str(home), "PATH": f"{tmp_path / 'worker_bin'}:/usr/bin:/bin"}
    w = subprocess.run(["bash", "-c", command], cwd=home, env=worker_env, capture_output=True, text=True, timeout=60)
    assert w.returncode == 0, w.stderr
    out = w.stdout.splitlines()
    assert out[0] == "RAN 1/2 10.1.0.7:8476 /mnt/runs/x/xla_cache"
    assert out[1:] == ["ARG " + a for a in ["run", "-c", "configs/default.yaml", "--run-dir", "/mnt/runs/x", override]]
