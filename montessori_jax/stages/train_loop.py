"""The training loop SFT and DPO share: steps ``start..total`` over global batches in each
epoch's order, metrics read one step late, checkpoints every ``save_every``.

The metrics of a step come to the host every ``log_every`` steps, read after the next step has
been dispatched, so the device never waits for the host between steps; all of them are read
before each checkpoint, so a resumed run has a row for every step up to it.
"""

from __future__ import annotations

from typing import Callable, Sequence

from montessori_jax import faults
from montessori_jax.core import batching, sharding


def run_steps(state, step_fn, *, start: int, total: int, steps_per_epoch: int, rows: Sequence, batch_size: int,
              seed: int, make_batch: Callable, write: Callable, log_every: int, save_every: int, save: Callable,
              fault: str, bar, after_step: Callable | None = None):
    """Run steps ``start..total``; returns (state, the last step).

    make_batch(idx) -> the placed batch of the rows ``idx``; write(entries) gets
    ``[(step, epoch, host metrics)]`` in step order; save(step, state) checkpoints (at every
    ``save_every`` and the last step, after the metrics up to it are written);
    after_step(step, state), when given, runs after each dispatch (e.g. an eval loss).
    """
    pending, ready = [], []

    def flush(entries):
        if entries:
            host = sharding.to_host([m for _, _, m in entries])
            write([(s, e, h) for (s, e, _), h in zip(entries, host)])

    order, order_epoch = None, None
    step = start
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # one sort and shuffle per epoch, not per step
            order, order_epoch = batching.epoch_order(rows, batch_size, seed, epoch), epoch
        state, m = step_fn(state, make_batch(order[k]))
        step += 1
        flush(ready)  # the metrics of steps before this one, which has been dispatched
        ready = []
        pending.append((step, epoch, m))
        if step % log_every == 0:
            ready, pending = pending, []
        if after_step is not None:
            after_step(step, state)
        if step % save_every == 0 or step == total:
            flush(ready + pending)
            ready, pending = [], []
            save(step, state)
            faults.point(fault)
        bar.update(1)
    return state, step
