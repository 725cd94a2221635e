"""Train state on disk with orbax: params, optimizer state and step as one pytree, plus a
JSON record (data cursor, hyperparameters, ...). Orbax writes each step to a temporary folder
and renames it when complete, so a kill never leaves a half-written checkpoint behind that a
resume would read."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from montessori_jax.errors import UserError


class Checkpoints:
    """Numbered checkpoints under ``directory``; the newest ``keep`` are kept."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)  # orbax wants absolute paths
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, meta: dict, wait: bool = False) -> None:
        """Save asynchronously (``wait`` blocks until it is on disk)."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self._mngr.wait_until_finished()

    def restore(self, like, step: int | None = None):
        """(state, meta) of ``step`` (default: the newest), shaped and sharded like ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{self.directory}: no checkpoint to restore")
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
