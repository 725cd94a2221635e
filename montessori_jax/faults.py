"""Named kill points for crash tests: ``point("sft.checkpoint")`` kills this process with
SIGKILL when ``MONTESSORI_KILL_AT`` names that point (``NAME`` or ``NAME:N`` for its N-th hit).

It is how the tests interrupt a run at a known place (after a synthesis round is committed, a
checkpoint is saved, an influence chunk is written) instead of racing a timer. Unset, a point
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "MONTESSORI_KILL_AT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
