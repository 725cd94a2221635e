"""Batching, numpy only: length buckets, one padder, packing, and the global batches of the
train steps.

A ``Row`` is one sequence of a batch (tokens, targets, segment ids: 1.. per packed example, 0
for padding). ``pad_rows`` is the one padder: it lays rows out as ``[B, T]`` arrays (``tokens``,
``positions``, ``segment_ids``, ``loss_mask``), right or left, with positions that restart at
0 in each segment. ``pad_batch`` pads plain token sequences through it; ``batches`` yields
length-sorted batches of examples; ``global_batch`` lays a train step's rows out as
``[A, M, T]`` (A micro-batches of M rows).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from montessori_jax.core.text import Example

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= n; past the largest, n rounded up to a multiple of the largest."""
    buckets = sorted(buckets)
    for b in buckets:
        if b >= n:
            return b
    top = buckets[-1]
    return -(-n // top) * top


LENGTH_MULTIPLE = 16  # planned lengths (``plan_lengths``) are multiples of this


def round_up(n: int, multiple: int = LENGTH_MULTIPLE) -> int:
    """The smallest multiple of ``multiple`` >= n."""
    return -(-n // multiple) * multiple


def plan_lengths(lengths: Sequence[int], group: int, max_lengths: int, multiple: int = LENGTH_MULTIPLE) -> tuple[int, ...]:
    """The padded lengths, at most ``max_lengths`` of them, that pad ``lengths`` least when they
    are sorted and taken ``group`` at a time (each group padded to the smallest planned length
    that holds its longest member, as ``batches(..., buckets=plan)`` and ``bucket_length`` do).

    Each distinct padded length is one more compiled program (or scan body), so a fixed ladder
    of powers of two pads a set of lengths up to 2x to keep their count small; planned from the
    lengths themselves, the same number of shapes pads far less (SmolLM2 on the first 32 seed
    tasks, 4 to a batch: 6,912 slots for 4,319 tokens on the ladder, 5,440 planned, both in 4
    shapes). Exact: a dynamic program over the groups' maxima (rounded up to ``multiple``)
    splitting them into at most ``max_lengths`` runs, each padded to its last (longest) value.
    """
    if group < 1 or max_lengths < 1 or multiple < 1:
        raise ValueError(f"group ({group}), max_lengths ({max_lengths}) and multiple ({multiple}) must be >= 1")
    if not lengths:
        return ()
    order = sorted(lengths)
    tops = [round_up(max(1, order[min(i + group, len(order)) - 1]), multiple) for i in range(0, len(order), group)]
    values = sorted(set(tops))
    weight = np.array([group * tops.count(v) for v in values], np.float64)  # padded rows per value
    n, k_max = len(values), min(max_lengths, len(values))
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    # best[k][j]: least slots covering values[:j] in k runs; cut[k][j]: where its last run starts
    best = np.full((k_max + 1, n + 1), np.inf)
    cut = np.zeros((k_max + 1, n + 1), np.int64)
    best[0, 0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            cost = best[k - 1, :j] + (cum[j] - cum[:j]) * values[j - 1]
            cut[k, j] = int(np.argmin(cost))
            best[k, j] = cost[cut[k, j]]
    k = int(np.argmin(best[1:, n])) + 1
    out, j = [], n
    while j > 0:
        out.append(values[j - 1])
        j, k = int(cut[k, j]), k - 1
    return tuple(sorted(out))


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Row:
    """One sequence of a batch: tokens, targets, and segment ids (1.. per packed example)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray

    def __len__(self):
        return len(self.tokens)


def rows_from_examples(examples: Sequence[Example]) -> list[Row]:
    return [Row(e.tokens, e.loss_mask, np.ones(len(e), np.int32)) for e in examples]


def pack_examples(examples: Sequence[Example], max_len: int) -> list[Row]:
    """Greedy packing in order: examples share a row while they fit; segment ids keep
    attention (and positions) within each example."""
    rows, cur = [], []

    def flush():
        if cur:
            rows.append(Row(np.concatenate([e.tokens for e in cur]),
                            np.concatenate([e.loss_mask for e in cur]),
                            np.concatenate([np.full(len(e), i + 1, np.int32) for i, e in enumerate(cur)])))
            cur.clear()

    for e in examples:
        if cur and sum(map(len, cur)) + len(e) > max_len:
            flush()
        cur.append(e)
    flush()
    return rows


def segment_positions(segment_ids_BT: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 at the start of each segment; 0 on padding (segment 0)."""
    B, T = segment_ids_BT.shape
    idx_BT = np.broadcast_to(np.arange(T), (B, T))
    starts_BT = np.concatenate([np.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    start_idx_BT = np.maximum.accumulate(np.where(starts_BT, idx_BT, 0), axis=1)
    return np.where(segment_ids_BT != 0, idx_BT - start_idx_BT, 0).astype(np.int32)


def pad_rows(rows: Sequence[Row], n_rows: int, length: int, pad_id: int,
             side: Literal["right", "left"] = "right") -> dict[str, np.ndarray]:
    """[n_rows, length] arrays; missing rows are all padding (segment 0, no targets)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    tokens_BT = np.full((n_rows, length), pad_id, np.int32)
    loss_mask_BT = np.zeros((n_rows, length), bool)
    segment_ids_BT = np.zeros((n_rows, length), np.int32)
    for i, r in enumerate(rows):
        n = len(r)
        if n > length:
            raise ValueError(f"sequence {i} has {n} tokens, more than length {length}")
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        tokens_BT[i, cols], loss_mask_BT[i, cols], segment_ids_BT[i, cols] = r.tokens, r.loss_mask, r.segment_ids
    return {"tokens": tokens_BT, "positions": segment_positions(segment_ids_BT), "segment_ids": segment_ids_BT,
            "loss_mask": loss_mask_BT}


def pad_batch(
    seqs: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    length: int,
    pad_id: int,
    side: Literal["right", "left"] = "right",
) -> dict[str, np.ndarray]:
    """Pad token sequences to [B, length] with ``pad_rows``.

    Returns ``tokens`` int32, ``segment_ids`` int32 (1 real, 0 pad), ``positions`` int32
    (0.. from each row's first real token, 0 on pads) and ``loss_mask`` bool (False on pads;
    with ``masks=None``, True on every real token but the first). An empty sequence gives an
    all-pad row.
    """
    rows = []
    for b, seq in enumerate(seqs):
        n = len(seq)
        if masks is None:
            mask = np.arange(n) > 0
        else:
            mask = np.asarray(masks[b], dtype=bool)
            if len(mask) != n:
                raise ValueError(f"mask {b} has {len(mask)} entries for {n} tokens")
        rows.append(Row(seq, mask, np.ones(n, np.int32)))
    return pad_rows(rows, len(seqs), length, pad_id, side)


def batches(
    examples: Sequence[Example],
    batch_size: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_id: int = 0,
    shuffle_seed: int | None = None,
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Right-padded batches of examples of similar length.

    Examples are sorted by length and chunked; with ``shuffle_seed`` the order of the batches
    (not their content) is shuffled. Each batch is padded to the bucket of its longest member,
    and a last partial batch gets all-pad rows (segment_ids 0) up to ``batch_size``. Yields
    (indices of the real examples in row order, batch dict from ``pad_rows``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort([len(ex.tokens) for ex in examples], kind="stable")
    chunks = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if shuffle_seed is not None:
        chunks = [chunks[i] for i in np.random.default_rng(shuffle_seed).permutation(len(chunks))]
    for idx in chunks:
        rows = rows_from_examples([examples[i] for i in idx])
        length = bucket_length(max(len(r) for r in rows), buckets)
        yield idx, pad_rows(rows, batch_size, length, pad_id)


def step_plan(n_rows: int, batch_size: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps) of a training run: whole epochs of global batches (the last
    one partial), cut at ``max_steps``."""
    steps_per_epoch = math.ceil(n_rows / batch_size)
    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    return steps_per_epoch, total


def epoch_order(rows: Sequence[Row], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of row indices: similar lengths together, batch order shuffled per epoch."""
    by_len = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    chunks = [by_len[i:i + batch_size] for i in range(0, len(by_len), batch_size)]
    perm = np.random.default_rng([seed, epoch]).permutation(len(chunks))
    return [chunks[i] for i in perm]


def global_batch(rows: Sequence[Row], idx: Sequence[int], batch_size: int, micro: int,
                 buckets: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """Pad a global batch to its bucket and split it into [accum, micro, T]."""
    length = bucket_length(max(len(rows[i]) for i in idx), buckets)
    flat = pad_rows([rows[i] for i in idx], batch_size, length, pad_id)
    return {k: v.reshape(batch_size // micro, micro, length) for k, v in flat.items()}
