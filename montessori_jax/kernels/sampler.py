"""Sampling: a jitted prefill and a ``lax.while_loop`` decode over a fixed-size KV cache.

One batch of ``Bp`` prompts with ``n`` samples each decodes as ``B = Bp * n`` rows:

    prompts, left-padded to a bucket P ─► prefill (one program) ─► state: prompt cache [L, Bp, P, K, E],
                                                   row cache [L, B, M, K, E], first token, keys, flags
    state ─► decode (one program: a while_loop, state donated) ─► tokens [B, M], counts, stop flags

The prefill runs once per prompt and its cache is the shared prefix of the prompt's ``n`` rows
(prompt-major; ``model.attention_with_prefix``), so n samples cost one prefill, hold one copy of
the prompt's keys and values, and a decode step reads it once per prompt. The decode loop stops when every
row has emitted a stop id or at the token limit; rows that are done keep running in the batch
but feed padding (segment 0), write nothing valid and emit the pad id.

Sampling math is fp32, in this order: presence penalty (vLLM's: subtract the penalty from the
logits of tokens already generated), temperature, top-k, top-p, then a categorical draw by
inverting the CDF at one uniform per row; temperature 0 is greedy. Row ``r``'s uniform at step
``t`` comes from ``fold_in(fold_in(fold_in(key(seed), row_id), sample), t)``, so a sample
depends on the seed, its prompt's id and its own index, not on how the batch was composed.

Compilations: prompt lengths, token limits and the number of prompts per batch are bucketed
(``PROMPT_BUCKETS``, ``NEW_TOKEN_BUCKETS``, powers of two), the limit itself and the sampling
values are runtime arguments, and every program is compiled ahead of time into a dict keyed
by its bucket: ``Sampler.num_compiled`` counts them.

Dimension letters: B rows (prompts x samples), P prompt bucket, M new-token bucket, S cache
slots, V vocab; ``Bp`` prompts in a batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from montessori_jax.core import batching, sharding
from montessori_jax.core import model as model_lib
from montessori_jax.errors import UserError

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STOP_SLOTS = 8  # stop ids are padded to a multiple of this (with -1), so they never recompile
_CDF_BLOCK = 256  # the inverse-CDF draw searches blocks of this many tokens, then one block


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    max_new_tokens: int = 256
    n: int = 1
    seed: int = 0

    def __post_init__(self):
        def bad(name, want):
            raise UserError(f"sampling parameter {name}={getattr(self, name)!r}: expected {want}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not (0 < self.top_p <= 1):
            bad("top_p", "a number in (0, 1]")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not math.isfinite(self.presence_penalty):
            bad("presence_penalty", "a finite number")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if int(self.n) != self.n or self.n < 1:
            bad("n", "an integer >= 1")
        if int(self.seed) != self.seed:
            bad("seed", "an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated sequence: its ids (the stop id included when it stopped) and why it ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (emitted a stop id) or "length" (reached max_new_tokens)


# ---------------------------------------------------------------------------------------------
# Logit processing: pure fp32 functions on [B, V] logits, unit-tested on fixed values.


def apply_presence_penalty(logits_BV: jax.Array, seen_BV: jax.Array, penalty) -> jax.Array:
    """vLLM's presence penalty: subtract ``penalty`` once from every token generated so far."""
    return logits_BV.astype(jnp.float32) - jnp.float32(penalty) * seen_BV.astype(jnp.float32)


def apply_temperature(logits_BV: jax.Array, temperature) -> jax.Array:
    """Divide by the temperature (> 0; temperature 0 means greedy and never gets here)."""
    return logits_BV.astype(jnp.float32) / jnp.float32(temperature)


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys that sort like the float32 values (-inf lowest)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def _keep_above_threshold(logits_BV: jax.Array, weights_BV: jax.Array, target_B: jax.Array) -> jax.Array:
    """Keep the logits >= t, where t is the largest logit such that the weights of the logits
    >= t sum to at least ``target``; -inf elsewhere.

    Exact and sort-free: t is found by bisection over the 2^32 order keys of the floats, 32
    passes of a masked sum (sorting a 49k vocabulary per row per step costs XLA:CPU ~10 ms).
    """
    keys_BV = _order_key(logits_BV)
    # invariant: weight(keys >= lo) >= target; the answer is the largest such lo in [min, max]
    lo_B = jnp.min(keys_BV, axis=-1)
    hi_B = jnp.max(keys_BV, axis=-1)

    def halve(_, bounds):
        lo_B, hi_B = bounds
        gap_B = hi_B - lo_B
        mid_B = lo_B + gap_B // 2 + gap_B % 2
        mass_B = jnp.sum(jnp.where(keys_BV >= mid_B[:, None], weights_BV, 0.0), axis=-1)
        ok_B = (mass_B >= target_B) | (gap_B == 0)
        return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B - 1)

    lo_B, _ = jax.lax.fori_loop(0, 32, halve, (lo_B, hi_B))
    return jnp.where(keys_BV >= lo_B[:, None], logits_BV, -jnp.inf)


def top_k_filter(logits_BV: jax.Array, k) -> jax.Array:
    """Keep the ``k`` largest logits of each row (and any tied with the k-th); -inf elsewhere.

    ``k`` may be traced; 0 (or >= V) keeps everything.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    B, V = logits_BV.shape
    k = jnp.asarray(k, jnp.int32)
    k = jnp.where((k <= 0) | (k > V), V, k).astype(jnp.float32)
    return _keep_above_threshold(logits_BV, jnp.ones_like(logits_BV), jnp.broadcast_to(k, (B,)))


def top_p_filter(logits_BV: jax.Array, p) -> jax.Array:
    """Nucleus filter: keep the most likely tokens, in order, while the mass before each is < p.

    That is the smallest set of top tokens whose probability reaches ``p`` (ties with its last
    member kept too), as vLLM and transformers define it; -inf elsewhere. ``p`` may be traced.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    p_B = jnp.broadcast_to(jnp.asarray(p, jnp.float32), logits_BV.shape[:1])
    return _keep_above_threshold(logits_BV, probs_BV, p_B)


def process_logits(
    logits_BV: jax.Array,
    seen_BV: jax.Array | None,
    *,
    temperature,
    top_k=0,
    top_p=1.0,
    presence_penalty=0.0,
) -> jax.Array:
    """Penalty, temperature (> 0), top-k, top-p, in that order: fp32 logits with -inf on the
    removed tokens; their softmax is the renormalised distribution the draw samples from.
    Values may be traced: a filter that is off (top_k 0, top_p 1) is skipped by ``lax.cond``."""
    x = logits_BV.astype(jnp.float32)
    if seen_BV is not None:
        x = apply_presence_penalty(x, seen_BV, presence_penalty)
    x = apply_temperature(x, temperature)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    x = jax.lax.cond(top_k > 0, top_k_filter, lambda x, _: x, x, top_k)
    x = jax.lax.cond(top_p < 1, top_p_filter, lambda x, _: x, x, top_p)
    return x


def greedy_tokens(logits_BV: jax.Array) -> jax.Array:
    """Argmax per row (the first on ties), as max + min-index: two vector reductions, which
    XLA:CPU runs several times faster than its variadic argmax reduce."""
    V = logits_BV.shape[-1]
    max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    idx_BV = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, 1)
    return jnp.min(jnp.where(logits_BV == max_B1, idx_BV, V), axis=-1).clip(0, V - 1)


def categorical_from_uniform(logits_BV: jax.Array, u_B: jax.Array) -> jax.Array:
    """An exact draw from softmax(logits) per row by inverting its CDF at ``u`` in [0, 1).

    Two levels: find the block of ``_CDF_BLOCK`` tokens whose cumulative mass passes u * total,
    then the token inside it. One uniform per row and one pass over V, instead of V Gumbel
    draws (which cost more than the rest of a small model's step on CPU). A token of zero
    probability is never chosen, rounding notwithstanding.
    """
    B, V = logits_BV.shape
    x = logits_BV.astype(jnp.float32)
    w_BV = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    pad = -V % _CDF_BLOCK
    w_BNC = jnp.pad(w_BV, ((0, 0), (0, pad))).reshape(B, -1, _CDF_BLOCK)
    N = w_BNC.shape[1]
    mass_BN = jnp.sum(w_BNC, axis=-1)
    block_cum_BN = jnp.cumsum(mass_BN, axis=-1)
    target_B = u_B.astype(jnp.float32) * block_cum_BN[:, -1]
    last_block_B = jnp.max(jnp.where(mass_BN > 0, jnp.arange(N), 0), axis=-1)
    block_B = jnp.minimum(jnp.sum(block_cum_BN <= target_B[:, None], axis=-1), last_block_B)
    before_B = jnp.where(
        block_B > 0, jnp.take_along_axis(block_cum_BN, jnp.maximum(block_B - 1, 0)[:, None], 1)[:, 0], 0.0
    )
    inner_BC = jnp.take_along_axis(w_BNC, block_B[:, None, None], 1)[:, 0]
    inner_cum_BC = before_B[:, None] + jnp.cumsum(inner_BC, axis=-1)
    last_inner_B = jnp.max(jnp.where(inner_BC > 0, jnp.arange(_CDF_BLOCK), 0), axis=-1)
    j_B = jnp.minimum(jnp.sum(inner_cum_BC <= target_B[:, None], axis=-1), last_inner_B)
    return (block_B * _CDF_BLOCK + j_B).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The engine


def _sample_step(logits_BV, seen_BV, keys_B, step, knobs):
    """Next token per row from fp32 logits: penalty, then greedy (temperature 0) or
    temperature, top-k, top-p and a draw. Every setting is a runtime value (``knobs``), so one
    program serves them all; ``lax.cond`` runs only the branches in use."""
    x = apply_presence_penalty(logits_BV, seen_BV, knobs["presence_penalty"])

    def draw(x):
        x = process_logits(x, None, temperature=knobs["temperature"], top_k=knobs["top_k"], top_p=knobs["top_p"])
        step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)
        u_B = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(step_keys_B)
        return categorical_from_uniform(x, u_B)

    return jax.lax.cond(knobs["temperature"] == 0, greedy_tokens, draw, x)


def _token_logprobs(logits_BV: jax.Array, tok_B: jax.Array, K: int):
    """The drawn tokens' log-probs [B] and the K most likely tokens' log-probs and ids [B, K],
    under log-softmax of the raw fp32 logits."""
    lp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    lp_B = jnp.take_along_axis(lp_BV, tok_B[:, None], axis=1)[:, 0]
    top_lp_BK, top_id_BK = jax.lax.top_k(lp_BV, K)
    return lp_B, top_lp_BK, top_id_BK.astype(jnp.int32)


@dataclasses.dataclass
class BatchOutput:
    """Host arrays of one decoded batch, rows prompt-major (prompt i, sample j at i * n + j).

    tokens: [B, M] int32, the pad id after a row's last token. num_tokens: [B], the stop id
    counted. stopped: [B] bool, True when the row emitted a stop id. steps: tokens drawn per
    row before the loop ended (the prefill's draw counted): the limit, or fewer when every row
    stopped early.
    """

    tokens: np.ndarray
    num_tokens: np.ndarray
    stopped: np.ndarray
    steps: int
    logprobs: np.ndarray | None = None  # [B, M] fp32: each drawn token's log-prob (``logprobs`` > 0)
    top_logprobs: np.ndarray | None = None  # [B, M, K] fp32, the K most likely tokens' log-probs
    top_ids: np.ndarray | None = None  # [B, M, K] int32, their ids

    def samples(self, n_prompts: int, n: int) -> list[list[Sample]]:
        out = []
        for i in range(n_prompts):
            row = []
            for j in range(n):
                r = i * n + j
                k = int(self.num_tokens[r])
                row.append(Sample(self.tokens[r, :k].tolist(), "stop" if self.stopped[r] else "length"))
            out.append(row)
        return out


class Sampler:
    """Generation engine for one model: ``generate(prompts, params, stop_ids)``.

    The model is split once into (graphdef, params) (``model.split_params``); the prefill and
    decode programs take the params as an argument and merge inside. Programs are compiled
    ahead of time, one per bucket, and kept in ``self.programs`` (``num_compiled`` counts them).

    batch_size: rows decoded together (prompts x samples): a batch holds
        ``max(1, batch_size // n)`` prompts. pad_id: the id written after a row's end.

    With the model placed on a mesh, a batch's prompt slots (rounded up to a multiple of its
    ``data`` size with dead rows) and their samples split over ``data``; a sample's key is
    (seed, row id, sample), so what it draws does not depend on the split.
    """

    def __init__(
        self,
        model: model_lib.Llama,
        *,
        pad_id: int = 0,
        prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
        new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS,
    ):
        self.cfg = model.cfg
        self.graphdef, self.params = model_lib.split_params(model)
        self.mesh = sharding.mesh_of(self.params)
        if not 0 <= pad_id < self.cfg.vocab_size:
            raise ValueError(f"pad_id {pad_id} outside the vocabulary of {self.cfg.vocab_size}")
        self.pad_id = int(pad_id)
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.new_token_buckets = tuple(sorted(new_token_buckets))
        self.programs: dict[tuple, Any] = {}
        self.num_traces = 0  # Python traces of either program; equals num_compiled if nothing retraces
        self.compile_seconds = 0.0
        self._prefill_jit = jax.jit(self._prefill, static_argnames=("n", "M", "K"))
        self._decode_jit = jax.jit(self._decode, static_argnames=("K",), donate_argnames=("state",))

    @property
    def num_compiled(self) -> int:
        return len(self.programs)

    # -- the two programs ------------------------------------------------------------------

    def _prefill(self, params, batch, knobs, *, n: int, M: int, K: int = 0):
        """Prompts [Bp, P] -> decode state for Bp * n rows, the first token already drawn.

        K > 0 also records, per drawn token, its log-prob and the K most likely tokens' (under
        the model's own distribution: log-softmax of the raw logits, before penalty,
        temperature and filters, as vLLM reports them); K = 0 computes none of it."""
        self.num_traces += 1
        model = model_lib.merge_params(self.graphdef, params)
        tokens_BpP = batch["tokens"]
        Bp, P = tokens_BpP.shape
        B, V = Bp * n, self.cfg.vocab_size
        prompt_cache = model_lib.init_cache(self.cfg, Bp, P)
        h_BpPD, prompt_cache = model(
            tokens_BpP, batch["positions"], batch["segment_ids"], cache=prompt_cache, cache_index=0,
            return_hidden=True,
        )
        logits_BpV = model.head(h_BpPD[:, -1])

        # n samples per prompt, rows prompt-major: the prompt's cache is their shared prefix, and
        # each row gets M slots of its own
        cache = {**model_lib.init_cache(self.cfg, B, M), "prefix": prompt_cache}
        logits_BV = jnp.repeat(logits_BpV, n, axis=0)
        row_ids_B = jnp.repeat(batch["row_ids"], n)
        sample_B = jnp.tile(jnp.arange(n, dtype=jnp.int32), Bp)
        key = jax.random.wrap_key_data(knobs["key"])
        keys_B = jax.vmap(lambda r, j: jax.random.fold_in(jax.random.fold_in(key, r), j))(
            row_ids_B, sample_B
        )
        live_B = jnp.repeat(batch["live"], n)
        seen_BV = jnp.zeros((B, V), jnp.bool_)

        first_B = _sample_step(logits_BV, seen_BV, keys_B, 0, knobs)
        first_B = jnp.where(live_B, first_B, self.pad_id).astype(jnp.int32)
        stopped_B = live_B & jnp.isin(first_B, knobs["stop_ids"])
        seen_BV = seen_BV.at[jnp.arange(B), first_B].set(True)  # pad on dead rows: harmless
        tokens_BM = jnp.full((B, M), self.pad_id, jnp.int32).at[:, 0].set(first_B)
        extra = {}
        if K:
            lp_B, top_lp_BK, top_id_BK = _token_logprobs(logits_BV, first_B, K)
            extra = {
                "lp": jnp.zeros((B, M), jnp.float32).at[:, 0].set(lp_B),
                "top_lp": jnp.zeros((B, M, K), jnp.float32).at[:, 0].set(top_lp_BK),
                "top_id": jnp.zeros((B, M, K), jnp.int32).at[:, 0].set(top_id_BK),
            }
        return self._rows_on_data({
            **extra,
            "cache": cache,
            "tokens": tokens_BM,
            "last": first_B,
            "pos": jnp.repeat(batch["lengths"], n),
            "step": jnp.int32(1),
            "done": ~live_B | stopped_B,
            "stopped": stopped_B,
            "num_tokens": live_B.astype(jnp.int32),
            "seen": seen_BV,
            "keys": keys_B,
        })

    def _rows_on_data(self, state: dict) -> dict:
        """Keep the decode state's rows (axis 1 of the KV cache, 0 elsewhere) split over data."""
        if self.mesh is None or sharding.data_size(self.mesh) == 1:
            return state

        def one(path, x):
            axis = 1 if path[0].key == "cache" and path[-1].key in ("k", "v") else 0
            return jax.lax.with_sharding_constraint(x, sharding.rows_sharding(self.mesh, x.ndim, axis))

        return jax.tree_util.tree_map_with_path(one, state)

    def _decode(self, params, state, knobs, *, K: int = 0):
        """Run the decode loop to the token limit or until every row is done."""
        self.num_traces += 1
        model = model_lib.merge_params(self.graphdef, params)
        B = state["last"].shape[0]

        def cond(s):
            return (s["step"] < knobs["limit"]) & ~jnp.all(s["done"])

        def body(s):
            step = s["step"]
            live_B = ~s["done"]
            h_B1D, cache = model(
                s["last"][:, None],
                s["pos"][:, None],
                live_B[:, None].astype(jnp.int32),
                cache=s["cache"],
                cache_index=step - 1,
                return_hidden=True,
            )
            logits_BV = model.head(h_B1D[:, 0])
            tok_B = _sample_step(logits_BV, s["seen"], s["keys"], step, knobs)
            tok_B = jnp.where(live_B, tok_B, self.pad_id).astype(jnp.int32)
            hit_B = live_B & jnp.isin(tok_B, knobs["stop_ids"])
            seen_BV = s["seen"].at[jnp.arange(B), tok_B].set(True)  # pad on done rows: harmless
            extra = {}
            if K:
                lp_B, top_lp_BK, top_id_BK = _token_logprobs(logits_BV, tok_B, K)
                extra = {
                    "lp": jax.lax.dynamic_update_slice(s["lp"], lp_B[:, None], (0, step)),
                    "top_lp": jax.lax.dynamic_update_slice(s["top_lp"], top_lp_BK[:, None], (0, step, 0)),
                    "top_id": jax.lax.dynamic_update_slice(s["top_id"], top_id_BK[:, None], (0, step, 0)),
                }
            return {
                **extra,
                "cache": cache,
                "tokens": jax.lax.dynamic_update_slice(s["tokens"], tok_B[:, None], (0, step)),
                "last": tok_B,
                "pos": s["pos"] + 1,
                "step": step + 1,
                "done": s["done"] | hit_B,
                "stopped": s["stopped"] | hit_B,
                "num_tokens": s["num_tokens"] + live_B.astype(jnp.int32),
                "seen": seen_BV,
                "keys": s["keys"],
            }

        return jax.lax.while_loop(cond, body, state)

    # -- host side ---------------------------------------------------------------------------

    def _program(self, kind: str, key: tuple, jitted, *args, **static):
        """The compiled program for this bucket, compiled on first use."""
        full_key = (kind,) + key
        if full_key not in self.programs:
            t0 = time.perf_counter()
            self.programs[full_key] = jitted.lower(*args, **static).compile()
            self.compile_seconds += time.perf_counter() - t0
        return self.programs[full_key]

    def _knobs(self, params: SamplingParams, stop_ids: Sequence[int]) -> dict:
        stop = list(dict.fromkeys(int(s) for s in stop_ids))
        size = max(STOP_SLOTS, -(-len(stop) // STOP_SLOTS) * STOP_SLOTS)
        return {
            "temperature": np.float32(params.temperature),
            "top_k": np.int32(params.top_k),
            "top_p": np.float32(params.top_p),
            "presence_penalty": np.float32(params.presence_penalty),
            "limit": np.int32(params.max_new_tokens),
            "stop_ids": np.asarray(stop + [-1] * (size - len(stop)), np.int32),
            "key": np.asarray(jax.random.key_data(jax.random.key(np.uint32(params.seed % 2**32)))),
        }

    def _check(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
        ctx = self.cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise UserError(f"prompt {i} is empty: generation needs at least one token")
            if len(p) + params.max_new_tokens > ctx:
                raise UserError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} it "
                    f"exceeds the model's context of {ctx}"
                )
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise UserError(f"prompt {i} has token id {lo if lo < 0 else hi} outside the vocabulary")

    def _dispatch(self, prompts, row_ids, params: SamplingParams, knobs, n_slots: int, K: int = 0):
        """Pad one batch, run prefill and decode; returns the (not yet fetched) final state."""
        n = params.n
        P = batching.bucket_length(max(len(p) for p in prompts), self.prompt_buckets)
        M = batching.bucket_length(params.max_new_tokens, self.new_token_buckets)
        Bp = sharding.round_rows(n_slots, self.mesh)
        tokens = np.full((Bp, P), self.pad_id, np.int32)
        segs = np.zeros((Bp, P), np.int32)
        positions = np.zeros((Bp, P), np.int32)
        lengths = np.zeros((Bp,), np.int32)
        live = np.zeros((Bp,), bool)
        rows = np.zeros((Bp,), np.int32)
        for b, (p, r) in enumerate(zip(prompts, row_ids)):
            tokens[b, P - len(p) :] = p
            segs[b, P - len(p) :] = 1
            positions[b, P - len(p) :] = np.arange(len(p))
            lengths[b], live[b], rows[b] = len(p), True, r
        batch = {"tokens": tokens, "segment_ids": segs, "positions": positions, "lengths": lengths,
                 "live": live, "row_ids": rows}
        batch = sharding.put_rows(batch, self.mesh)
        if self.mesh is not None:
            knobs = sharding.put(knobs, jax.tree.map(lambda _: sharding.replicated(self.mesh), knobs))
        lp_key = (K,) if K else ()  # the default programs keep their keys
        prefill = self._program(
            "prefill", (Bp, P, M, n) + lp_key, self._prefill_jit, self.params, batch, knobs, n=n, M=M, K=K
        )
        state = prefill(self.params, batch, knobs)
        # keyed by the prompt rows and n apart: the prompts' shared cache (the state's prefix)
        # has Bp rows, so 1 prompt x n=2 and 2 prompts x n=1 (both 2 decode rows) are two programs
        decode = self._program(
            "decode", (Bp, n, P, M) + lp_key, self._decode_jit, self.params, state, knobs, K=K
        )
        return decode(self.params, state, knobs)

    @staticmethod
    def _collect(state) -> BatchOutput:
        tokens, num_tokens, stopped, steps = sharding.to_host(
            (state["tokens"], state["num_tokens"], state["stopped"], state["step"])
        )
        out = BatchOutput(tokens, num_tokens, stopped, int(steps))
        if "lp" in state:
            out.logprobs, out.top_logprobs, out.top_ids = sharding.to_host(
                (state["lp"], state["top_lp"], state["top_id"]))
        return out

    def run_batch(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stop_ids: Sequence[int] = (),
        row_ids: Sequence[int] | None = None,
        logprobs: int = 0,
    ) -> BatchOutput:
        """Decode these prompts as one batch (prompt slots rounded up to a power of two).

        logprobs: K > 0 also returns each drawn token's log-prob and the K most likely ones
        (one more program per bucket; K = 0, the default, computes none of it)."""
        self._check(prompts, params)
        if int(logprobs) != logprobs or not 0 <= logprobs <= self.cfg.vocab_size:
            raise UserError(f"logprobs={logprobs!r}: expected an integer in [0, {self.cfg.vocab_size}]")
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        knobs = self._knobs(params, stop_ids)
        out = self._collect(
            self._dispatch(prompts, row_ids, params, knobs, batching.pow2_at_least(len(prompts)), K=int(logprobs))
        )
        B = len(prompts) * params.n
        cut = (lambda a: None if a is None else a[:B])
        return BatchOutput(out.tokens[:B], out.num_tokens[:B], out.stopped[:B], out.steps,
                           cut(out.logprobs), cut(out.top_logprobs), cut(out.top_ids))

    def generate_batches(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stop_ids: Sequence[int] = (),
        *,
        batch_size: int = 16,
        row_ids: Sequence[int] | None = None,
    ) -> Iterator[tuple[list[int], list[list[Sample]]]]:
        """Yield (indices into ``prompts``, their samples) batch by batch, longest prompts first.

        Batch k+1 is dispatched before batch k is read back, so the host's work on a batch
        (detokenizing, writing) overlaps the device's work on the next.
        row_ids: one int per prompt for the random keys (default: its index).
        """
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}: expected an integer >= 1")
        self._check(prompts, params)
        row_ids = list(range(len(prompts))) if row_ids is None else [int(r) for r in row_ids]
        if len(row_ids) != len(prompts):
            raise ValueError(f"{len(row_ids)} row ids for {len(prompts)} prompts")
        knobs = self._knobs(params, stop_ids)
        per_batch = max(1, batch_size // params.n)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        chunks = [order[i : i + per_batch] for i in range(0, len(order), per_batch)]
        pending = None
        for idx in chunks:
            slots = min(per_batch, batching.pow2_at_least(len(idx)))
            state = self._dispatch([prompts[i] for i in idx], [row_ids[i] for i in idx], params, knobs, slots)
            if pending is not None:
                yield pending[0], self._collect(pending[1]).samples(len(pending[0]), params.n)
            pending = (idx, state)
        if pending is not None:
            yield pending[0], self._collect(pending[1]).samples(len(pending[0]), params.n)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stop_ids: Sequence[int] = (),
        *,
        batch_size: int = 16,
        row_ids: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """``params.n`` samples for each prompt (token id lists), in input order:
        ``result[i][j]`` is prompt i's sample j."""
        results: list[Any] = [None] * len(prompts)
        for idx, samples in self.generate_batches(prompts, params, stop_ids, batch_size=batch_size, row_ids=row_ids):
            for i, s in zip(idx, samples):
                results[i] = s
        return results
