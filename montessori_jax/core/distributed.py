"""Joining a multi-process JAX cluster, and what every stage needs to run in one.

JAX's own multi-controller runtime is the engine: every process runs the same program on the
same global batch, each filling and computing only the shards on its own devices. Three ways in:

- ``MONTESSORI_COORDINATOR`` (host:port), ``MONTESSORI_NUM_PROCESSES`` and
  ``MONTESSORI_PROCESS_ID``: any launcher, and the tests;
- (more launchers are added by ``initialize`` below as they are supported).

On CPU the collectives go through gloo. One process (``is_writer()``: process 0) writes each
shared artifact; ``barrier(name)`` makes every process wait for the others, so no process reads
a file another has not finished.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

from montessori_jax.errors import UserError

ENV_COORDINATOR = "MONTESSORI_COORDINATOR"
ENV_NUM_PROCESSES = "MONTESSORI_NUM_PROCESSES"
ENV_PROCESS_ID = "MONTESSORI_PROCESS_ID"
ENV_TIMEOUT = "MONTESSORI_INIT_TIMEOUT"  # seconds to wait for the coordinator (default 300)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise UserError(f"{ENV_COORDINATOR} is set but {name} is not: set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} too")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r}: not an integer") from None


def cluster_from_env() -> dict | None:
    """The cluster that ``MONTESSORI_*`` describe: {coordinator, num_processes, process_id,
    timeout}, or None when ``MONTESSORI_COORDINATOR`` is unset or names a single process."""
    coordinator = os.environ.get(ENV_COORDINATOR)
    if not coordinator:
        return None
    n, i = _env_int(ENV_NUM_PROCESSES), _env_int(ENV_PROCESS_ID)
    if n < 1 or not 0 <= i < n:
        raise UserError(f"{ENV_PROCESS_ID}={i} with {ENV_NUM_PROCESSES}={n}: need 0 <= id < processes")
    if ":" not in coordinator:
        raise UserError(f"{ENV_COORDINATOR}={coordinator!r}: expected host:port")
    timeout = int(os.environ.get(ENV_TIMEOUT, "300"))
    return None if n == 1 else {"coordinator": coordinator, "num_processes": n, "process_id": i, "timeout": timeout}


def initialize() -> bool:
    """Join the cluster the environment describes (see the module doc), once, before any JAX
    computation. Returns whether this process is part of a multi-process cluster."""
    if jax.distributed.is_initialized():
        return True
    cluster = cluster_from_env()
    if cluster is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cluster["coordinator"], num_processes=cluster["num_processes"],
                               process_id=cluster["process_id"], initialization_timeout=cluster["timeout"])
    return True


def is_writer() -> bool:
    """Whether this process writes the shared artifacts (process 0; the only one alone)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing when alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
