"""Joining a multi-process JAX cluster, and what every stage needs to run in one.

JAX's own multi-controller runtime is the engine: every process runs the same program on the
same global batch, each filling and computing only the shards on its own devices. Three ways in,
tried in this order:

- ``MONTESSORI_COORDINATOR`` (host:port), ``MONTESSORI_NUM_PROCESSES`` and
  ``MONTESSORI_PROCESS_ID``: any launcher, and the tests;
- Slurm: a job step started by ``srun`` with more than one task (``SLURM_STEP_NUM_TASKS`` or
  ``SLURM_NTASKS``, ``SLURM_PROCID``, the step's node list). The coordinator is the first host of
  the node list, on ``MONTESSORI_PORT`` or a port derived from ``SLURM_JOB_ID``. With more than
  one task on a node (one task per GPU), each task is given its own GPU through
  ``CUDA_VISIBLE_DEVICES`` (its ``SLURM_LOCALID``-th entry of the list Slurm set, if any) before
  JAX starts its backend. ``MONTESSORI_SLURM=0`` ignores Slurm (independent tasks);
- a TPU VM pod slice (``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` naming several workers,
  ``MEGASCALE_NUM_SLICES``, or ``MONTESSORI_TPU_POD=1``): JAX detects the rest itself.

``MONTESSORI_INIT_TIMEOUT`` (seconds, default 300) bounds the wait for the coordinator: a process
that cannot reach it fails with one line naming the address (JAX itself would abort the process
with a C++ fatal error, so the coordinator's port is probed first).

On CPU the collectives go through gloo. One process (``is_writer()``: process 0) writes each
shared artifact; ``barrier(name)`` makes every process wait for the others, so no process reads
a file another has not finished.
"""

from __future__ import annotations

import os
import socket
import time

import jax
from jax.experimental import multihost_utils

from montessori_jax import files
from montessori_jax.errors import UserError

ENV_COORDINATOR = "MONTESSORI_COORDINATOR"
ENV_NUM_PROCESSES = "MONTESSORI_NUM_PROCESSES"
ENV_PROCESS_ID = "MONTESSORI_PROCESS_ID"
ENV_TIMEOUT = "MONTESSORI_INIT_TIMEOUT"  # seconds to wait for the coordinator (default 300)
ENV_PORT = "MONTESSORI_PORT"  # the coordinator's port under Slurm
ENV_SLURM = "MONTESSORI_SLURM"  # 0: do not join a cluster from Slurm's variables
ENV_TPU_POD = "MONTESSORI_TPU_POD"  # 1: join the TPU pod slice JAX detects


def _env_int(env, name: str) -> int:
    value = env.get(name)
    if value is None:
        raise UserError(f"{ENV_COORDINATOR} is set but {name} is not: set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} too")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r}: not an integer") from None


def _timeout(env) -> int:
    value = env.get(ENV_TIMEOUT, "300")
    try:
        seconds = int(value)
    except ValueError:
        raise UserError(f"{ENV_TIMEOUT}={value!r}: not a whole number of seconds") from None
    if seconds < 1:
        raise UserError(f"{ENV_TIMEOUT}={value!r}: need at least 1 second")
    return seconds


def cluster_from_env(env=None) -> dict | None:
    """The cluster that ``MONTESSORI_*`` describe: {coordinator, num_processes, process_id,
    timeout}, or None when ``MONTESSORI_COORDINATOR`` is unset or names a single process."""
    env = os.environ if env is None else env
    coordinator = env.get(ENV_COORDINATOR)
    if not coordinator:
        return None
    n, i = _env_int(env, ENV_NUM_PROCESSES), _env_int(env, ENV_PROCESS_ID)
    if n < 1 or not 0 <= i < n:
        raise UserError(f"{ENV_PROCESS_ID}={i} with {ENV_NUM_PROCESSES}={n}: need 0 <= id < processes")
    if ":" not in coordinator:
        raise UserError(f"{ENV_COORDINATOR}={coordinator!r}: expected host:port")
    timeout = _timeout(env)
    return None if n == 1 else {"coordinator": coordinator, "num_processes": n, "process_id": i, "timeout": timeout}


# ---------------------------------------------------------------------------------------------
# Slurm


def _split_top(text: str) -> list[str]:
    """Split on the commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"node list {text!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise UserError(f"node list {text!r}: unbalanced brackets")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_range(item: str, where: str) -> list[str]:
    """``07`` -> [07]; ``01-03`` -> [01, 02, 03] (zero padding kept, as Slurm writes it)."""
    lo, sep, hi = item.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise UserError(f"node list {where!r}: cannot read the range {item!r}")
    if not sep:
        return [lo]
    if int(hi) < int(lo):
        raise UserError(f"node list {where!r}: the range {item!r} runs backwards")
    return [str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1)]


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list, e.g. ``node[01-03,07],gpu5,rack[1-2]-n[1,3]`` -> every host
    name in order."""
    hosts = []
    for part in _split_top(text.strip()):
        names = [""]
        rest = part
        while rest:
            open_ = rest.find("[")
            if open_ < 0:
                names = [n + rest for n in names]
                break
            close = rest.find("]", open_)
            choices = [x for item in rest[open_ + 1:close].split(",") for x in _expand_range(item, text)]
            names = [n + rest[:open_] + c for n in names for c in choices]
            rest = rest[close + 1:]
        hosts.extend(names)
    return hosts


def _tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from Slurm's ``SLURM_STEP_TASKS_PER_NODE``, e.g. ``2(x3),1``."""
    counts = []
    for item in spec.split(","):
        count, _, rep = item.partition("(x")
        counts += [int(count)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[node_id] if node_id < len(counts) else counts[-1]


def slurm_cluster(env) -> dict | None:
    """The cluster of a Slurm job step (see the module doc): {coordinator, num_processes,
    process_id, timeout, cuda_visible_devices} (the last None when it is to be left alone), or
    None outside a multi-task step."""
    if env.get(ENV_SLURM, "1") == "0" or "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    n = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if not nodes or not n or int(n) <= 1:
        return None
    n, i = int(n), int(env["SLURM_PROCID"])
    try:
        port = int(env[ENV_PORT]) if env.get(ENV_PORT) else 50000 + int(env["SLURM_JOB_ID"]) % 10000
    except ValueError:
        raise UserError(f"{ENV_PORT}={env.get(ENV_PORT)!r}: not a port number") from None
    local_id = int(env.get("SLURM_LOCALID", "0"))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    local_tasks = _tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0")))
    cuda = None
    if local_tasks > 1:
        # one task per GPU: this task's own GPU, the local_id-th of what Slurm gave the node
        # (a list of one means srun has already bound a GPU to each task)
        given = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        if not given:
            cuda = str(local_id)
        elif len(given) > 1:
            if local_id >= len(given):
                raise UserError(f"Slurm task {local_id} of {local_tasks} on this node, but CUDA_VISIBLE_DEVICES="
                                f"{env['CUDA_VISIBLE_DEVICES']} names {len(given)} GPUs: ask for one GPU per task")
            cuda = given[local_id].strip()
    return {"coordinator": f"{expand_hostlist(nodes)[0]}:{port}", "num_processes": n, "process_id": i,
            "timeout": _timeout(env), "cuda_visible_devices": cuda}


def processes_on_this_host(env=None) -> int:
    """How many processes of this job share this machine's memory: all of them for a cluster
    whose coordinator is on loopback (several processes on one machine, as the tests run),
    Slurm's tasks on this node, else 1 (one process per host: TPU slices, one task per node)."""
    env = os.environ if env is None else env
    cluster = cluster_from_env(env)
    if cluster:
        host = _host_port(cluster["coordinator"])[0]
        return cluster["num_processes"] if host in ("localhost", "::1") or host.startswith("127.") else 1
    if env.get(ENV_SLURM, "1") != "0" and "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        return _tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0")))
    return 1


# ---------------------------------------------------------------------------------------------
# TPU pod slices


def is_tpu_pod(env) -> bool:
    """Whether this process is one worker of a TPU VM slice of several workers (or of several
    slices), as the variables JAX's own TPU cluster detection reads say."""
    if env.get(ENV_TPU_POD) in ("0", "1"):
        return env[ENV_TPU_POD] == "1"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    slices = env.get("MEGASCALE_NUM_SLICES", "1")
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or (slices.isdigit() and int(slices) > 1)


# ---------------------------------------------------------------------------------------------
# Joining


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise UserError(f"coordinator {address!r}: the port is not a number") from None


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Connect to the coordinator's port until it answers; UserError (one line naming the
    address) after ``timeout`` seconds."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise UserError(f"cannot reach the cluster's coordinator at {address} after {timeout:g} s "
                            f"({type(last).__name__}: {last}); is process 0 running? ({ENV_TIMEOUT} sets the wait)")
        time.sleep(0.25)


def check_can_listen(address: str) -> None:
    """Process 0 serves the coordinator on ``address``'s port: a clear error when it is taken."""
    _, port = _host_port(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            raise UserError(f"process 0 cannot serve the coordinator at {address}: port {port} ({e.strerror}); "
                            f"choose another port") from None


def _join(cluster: dict) -> None:
    address, timeout = cluster["coordinator"], cluster["timeout"]
    t0 = time.monotonic()
    if cluster["process_id"] == 0:
        check_can_listen(address)
    else:
        wait_for_coordinator(address, timeout)
    left = max(1, int(timeout - (time.monotonic() - t0)))
    # every setting is explicit: JAX's own detection would also pin local_device_ids to
    # SLURM_LOCALID (one GPU per process, even with one task per node)
    jax.distributed.initialize(coordinator_address=address, num_processes=cluster["num_processes"],
                               process_id=cluster["process_id"], initialization_timeout=left,
                               cluster_detection_method="deactivate")


def initialize() -> bool:
    """Join the cluster the environment describes (see the module doc), once, before any JAX
    computation. Returns whether this process is part of a multi-process cluster."""
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    cluster = cluster_from_env(env) or slurm_cluster(env)
    if cluster is not None:
        if cluster.get("cuda_visible_devices") is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = cluster["cuda_visible_devices"]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _join(cluster)
        return True
    if is_tpu_pod(env):
        jax.distributed.initialize(initialization_timeout=_timeout(env))
        return jax.process_count() > 1
    return False


def is_writer() -> bool:
    """Whether this process writes the shared artifacts (process 0; the only one alone). Asks
    nothing of JAX's backend when no cluster was joined."""
    return files.is_writer()


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing when alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
