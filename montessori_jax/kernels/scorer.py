"""Each row's (nll_sum, count) under a model: one jitted program per length bucket. What
``montessori score``, evaluation and the SFT stage's reference loss build on.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from montessori_jax.core import batching, sharding, text
from montessori_jax.core import model as model_lib
from montessori_jax.core.losses import token_nll


class Scorer:
    """One jitted program giving each row's (nll_sum, count) under params (graphdef, params).

    With params placed on a mesh, each batch's rows split over its ``data`` axis (the batch
    size rounded up to a multiple of it) and are read back whole in every process.
    """

    def __init__(self, graphdef, params: dict):
        self.params = params

        def nll(params, batch):
            logits = model_lib.apply(graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
            return token_nll(logits, batch["tokens"], batch["loss_mask"])

        self._nll = jax.jit(nll)

    @classmethod
    def of(cls, model) -> "Scorer":
        return cls(*model_lib.split_params(model))

    def nll_sums(self, examples: Sequence[text.Example], batch_size: int = 8, pad_id: int = 0,
                 progress: bool = False, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-example (nll_sum, count) in input order (under ``params`` when given)."""
        params = self.params if params is None else params
        mesh = sharding.mesh_of(params)
        sums = np.zeros(len(examples), np.float64)
        counts = np.zeros(len(examples), np.int64)
        bar = tqdm(total=len(examples), desc="score", unit="row", disable=not progress)
        for idx, batch in batching.batches(examples, sharding.round_rows(batch_size, mesh), pad_id=pad_id):
            s, c = sharding.to_host(self._nll(params, sharding.put_rows(batch, mesh)))
            n = len(idx)
            sums[idx], counts[idx] = s[:n], c[:n]
            bar.update(n)
        bar.close()
        return sums, counts
