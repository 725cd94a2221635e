"""Start a real JAX cluster of N processes on loopback (gloo on CPU) for a test: each process
runs the same command with ``MONTESSORI_COORDINATOR``/``_NUM_PROCESSES``/``_PROCESS_ID`` set and
``devices`` fake CPU devices; returns their CompletedProcess results in process order."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(i: int, n: int, port: int, devices: int = 2, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"MONTESSORI_COORDINATOR": f"127.0.0.1:{port}", "MONTESSORI_NUM_PROCESSES": str(n),
                "MONTESSORI_PROCESS_ID": str(i), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""), "TF_CPP_MIN_LOG_LEVEL": "2"})
    env.update(extra or {})
    return env


def start_cluster(argv: list[str], n: int = 2, devices: int = 2, cwd: str | None = None,
                  extra_env: dict | None = None, output=subprocess.PIPE) -> list[subprocess.Popen]:
    """The n processes of a new cluster, started (``run_cluster`` without the wait)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, *argv], env=cluster_env(i, n, port, devices, extra_env), cwd=cwd,
                             stdout=output, stderr=output, text=True) for i in range(n)]


def run_cluster(argv: list[str], n: int = 2, devices: int = 2, timeout: float = 600, cwd: str | None = None,
                extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """``python ARGV...`` in n processes of one cluster (``argv`` starts after the interpreter,
    e.g. ``["-m", "montessori_jax.cli", "score", ...]``)."""
    procs = start_cluster(argv, n, devices, cwd, extra_env)
    results = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results
