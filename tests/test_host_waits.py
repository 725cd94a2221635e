"""The training loops never wait on the host inside a step: building a batch and dispatching a
step read no device value back to the host and make no implicit transfer (each runs under
``no_host_waits``), and the metrics are read one step late."""

import contextlib
import functools
import json

import jax
import numpy as np
import pytest
from jax._src.array import ArrayImpl

from montessori_jax.cli import main
from montessori_jax.core import batching, sharding
from montessori_jax.kernels import dpo as dpo_lib
from montessori_jax.kernels import train_step

WORDS = "the cat sat on the mat a dog ran in the park sun is warm today".split()


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_waits():
    """Refuse, inside the block, every way Python code can wait for a device value: reading an
    array to the host (``__array__``, ``float``, ``int``, ``bool``, ``item``, ``tolist``,
    ``jax.device_get``, ``sharding.to_host`` (the package's one read-back path),
    ``block_until_ready``, ``addressable_data``), and any implicit transfer (``transfer_guard``:
    on CPU, device-to-host copies are free, so the guard alone would not see them; numpy's
    buffer-protocol read of a CPU array cannot be intercepted, which is why the package reads
    back only through ``to_host``)."""

    def refuse(*args, **kwargs):
        raise HostRead("a host read inside a step")

    saved = {name: getattr(ArrayImpl, name) for name in READS}
    saved_get, saved_to_host = jax.device_get, sharding.to_host
    try:
        for name in READS:
            setattr(ArrayImpl, name, refuse)
        jax.device_get = sharding.to_host = refuse
        with jax.transfer_guard("disallow"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(ArrayImpl, name, fn)
        jax.device_get, sharding.to_host = saved_get, saved_to_host


READS = ("__array__", "__float__", "__int__", "__bool__", "item", "tolist", "block_until_ready", "addressable_data")


def _guarded(fn, calls):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        calls.append(fn.__name__)
        with no_host_waits():
            return fn(*args, **kwargs)

    return run


def _guard_factory(factory, calls):
    def make(*args, **kwargs):
        return _guarded(factory(*args, **kwargs), calls)

    return make


def test_guard_catches_host_reads():
    x = jax.numpy.ones(3) * 2
    for read in (lambda: float(x[0]), lambda: jax.device_get(x), lambda: x.tolist(), lambda: sharding.to_host(x),
                 lambda: jax.jit(lambda a: a + 1)(np.ones(3))):
        with pytest.raises(Exception, match="host read inside a step|Disallowed host-to-device"):
            with no_host_waits():
                read()
    assert float(x[0]) == 2.0  # restored after the block


def test_sft_and_dpo_steps_make_no_host_transfer(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    calls = []
    monkeypatch.setattr(train_step, "make_train_step", _guard_factory(train_step.make_train_step, calls))
    monkeypatch.setattr(batching, "global_batch", _guarded(batching.global_batch, calls))
    monkeypatch.setattr(dpo_lib, "make_train_step", _guard_factory(dpo_lib.make_train_step, calls))
    monkeypatch.setattr(dpo_lib, "make_batch", _guarded(dpo_lib.make_batch, calls))

    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"instruction": " ".join(WORDS[i:i + 4]), "response": " ".join(WORDS[i + 2:i + 7])}) + "\n")
    assert main(["sft", "--out", str(tmp_path / "sft"), f"student.path={folder}", f"sft.data={data}",
                 "sft.batch_size=2", "sft.micro_batch_size=1", "sft.log_every=1", "sft.export=false"]) == 0
    assert calls.count("step") == 4 and calls.count("global_batch") >= 4
    losses = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]  # every step's metrics, read one step late

    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": " ".join(WORDS[i:i + 5]), "chosen": " ".join(WORDS[i + 1:i + 4]),
                                "rejected": " ".join(WORDS[i + 3:i + 5]), "chosen_id": f"c{i}",
                                "rejected_id": f"r{i}", "seed_prompt": i}) + "\n")
    calls.clear()
    assert main(["dpo", "--out", str(tmp_path / "dpo"), f"teacher.path={folder}", f"dpo.pairs={pairs}",
                 "dpo.batch_size=2", "dpo.epochs=1", "dpo.log_every=1", "dpo.export=false"]) == 0
    assert calls.count("<lambda>") == 2 and calls.count("make_batch") >= 2
