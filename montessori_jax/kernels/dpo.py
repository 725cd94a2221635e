"""DPO's compiled pieces: the sigmoid loss on sequence log-probs, pairs encoded as token rows
(TRL's ``keep_end`` truncation) and laid out as batches ``[A, 2M, T]`` (chosen rows, then
rejected rows), the jitted train step (chosen and rejected in one forward), log-probs and the
held-out evaluation. The stage (``stages/dpo``) owns the files, the cache and resume.

Dimension letters: A accumulation steps, M pairs per micro-batch (2M rows), T tokens, V vocab,
P pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from montessori_jax.core import batching, optim, sharding, text
from montessori_jax.core import model as model_lib
from montessori_jax.core.losses import token_nll
from montessori_jax.errors import UserError
from montessori_jax.kernels import train_step

# ---------------------------------------------------------------------------------------------
# The loss


def sequence_logps(logits_BTV: jax.Array, tokens_BT: jax.Array, loss_mask_BT: jax.Array):
    """(sum of log p over each row's target tokens [B], number of targets [B]), fp32."""
    nll_B, count_B = token_nll(logits_BTV, tokens_BT, loss_mask_BT)
    return -nll_B, count_B


def dpo_loss(policy_chosen_P, policy_rejected_P, ref_chosen_P, ref_rejected_P, beta: float, mask_P=None):
    """Sigmoid DPO loss of P pairs from sequence log-probs.

    Returns ``((loss_sum, count), (chosen_rewards_P, rejected_rewards_P))``: the loss summed
    over the pairs where ``mask_P`` is 1 (all when None) and that count, as every loss here;
    the implicit rewards ``beta * (policy - reference)`` of each side, per pair.
    """
    chosen_rewards = beta * (policy_chosen_P - ref_chosen_P)
    rejected_rewards = beta * (policy_rejected_P - ref_rejected_P)
    loss_P = -jax.nn.log_sigmoid(chosen_rewards - rejected_rewards)
    mask_P = jnp.ones_like(loss_P) if mask_P is None else mask_P.astype(loss_P.dtype)
    return ((loss_P * mask_P).sum(), mask_P.sum()), (chosen_rewards, rejected_rewards)


# ---------------------------------------------------------------------------------------------
# Data: pairs -> token rows -> batches [A, 2M, T] (chosen rows, then rejected rows)


@dataclasses.dataclass(frozen=True)
class PairExample:
    """One pair as two token rows sharing the (possibly truncated) prompt."""

    chosen: text.Example
    rejected: text.Example
    prompt_truncated: bool = False  # the prompt kept only its last max_prompt_len tokens
    answers_truncated: bool = False  # the longer answer (or both) lost its end

    @property
    def truncated(self) -> bool:
        return self.prompt_truncated or self.answers_truncated

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def _answer_tokens(tok, prompt, answer: str, system, prompt_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The assistant turn's tokens after ``prompt_ids`` (through its last target) and their mask."""
    ex = text.encode_example(tok, prompt, answer, system=system)
    P = len(prompt_ids)
    if ex.tokens[:P].tolist() != prompt_ids:
        raise UserError(f"chat template of {tok.name_or_path}: the prompt does not tokenize the same "
                        "alone and followed by an answer")
    mask = ex.loss_mask[P:]
    n = int(np.nonzero(mask)[0][-1]) + 1 if mask.any() else len(mask)
    return ex.tokens[P:P + n], mask[:n]


def encode_pair(tok, prompt: str, chosen: str, rejected: str, system: str | None = None,
                max_prompt_len: int = 128, max_len: int = 1024) -> PairExample:
    """Both answers after the prompt under the chat template; targets are the answers' tokens.

    TRL's rule (keep_end): when prompt + the longer answer exceed ``max_len``, the prompt keeps
    its last ``max_prompt_len`` tokens; when that is still too long, each answer keeps its first
    ``max_len - max_prompt_len`` tokens. A pair that fits is kept whole.
    """
    prompt_ids = text.encode_prompt(tok, prompt, system)
    answers = [_answer_tokens(tok, prompt, a, system, prompt_ids) for a in (chosen, rejected)]
    longer = max(len(t) for t, _ in answers)
    kept = prompt_ids[-max_prompt_len:] if len(prompt_ids) + longer > max_len else prompt_ids
    cut_answers = len(kept) + longer > max_len  # then the longer answer is always cut
    room = max_len - max_prompt_len
    kept = np.asarray(kept, np.int32)
    rows = []
    for toks, mask in answers:
        if cut_answers:
            toks, mask = toks[:room], mask[:room]
        rows.append(text.Example(np.concatenate([kept, toks]).astype(np.int32),
                                 np.concatenate([np.zeros(len(kept), bool), mask]),
                                 truncated=len(kept) < len(prompt_ids) or cut_answers))
    return PairExample(rows[0], rows[1], len(kept) < len(prompt_ids), cut_answers)


def split_pairs(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) pair indices, each in order: ``round(fraction * n)`` held out, at
    least one when ``fraction > 0`` and ``n >= 2``, and always at least one left to train on."""
    n_eval = int(round(fraction * n)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    else:
        n_eval = 0
    held = set(np.random.default_rng([seed, 2]).permutation(n)[:n_eval].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


# A DPO row is a whole few-shot prompt and an answer (the default's: 420-630 tokens), and each
# costs a forward and a backward pass of the teacher: rows pad to a multiple of 128 up to 1024
# (a 630-token row to 640, not 1024), then in steps of 1.5x or 2x.
DPO_BUCKETS = tuple(range(128, 1025, 128)) + (1536, 2048, 3072, 4096, 6144, 8192)


def make_batch(pairs: Sequence[PairExample], idx: Sequence[int], batch_pairs: int, micro_pairs: int,
               pad_id: int, ref: tuple[np.ndarray, np.ndarray] | None = None,
               buckets: Sequence[int] = DPO_BUCKETS) -> dict[str, np.ndarray]:
    """[A, 2M, T] arrays for the pairs ``idx`` (at most ``batch_pairs``), A = batch_pairs / M.

    In each micro-batch, rows 0..M-1 are the chosen answers and rows M..2M-1 the rejected ones
    of the same pairs; a missing pair is two all-pad rows with ``pair_mask`` 0. ``ref_logps``
    [A, 2M] holds the cached reference log-probs in the same layout (zeros without ``ref``).
    """
    M = micro_pairs
    A = batch_pairs // M
    length = batching.bucket_length(max(len(pairs[i]) for i in idx), buckets)
    empty_t, empty_m = np.zeros(0, np.int32), np.zeros(0, bool)
    parts, refs, masks = [], np.zeros((A, 2 * M), np.float32), np.zeros((A, 2 * M), np.float32)
    for a in range(A):
        group = list(idx[a * M:(a + 1) * M])
        fill = M - len(group)
        seqs = ([pairs[i].chosen.tokens for i in group] + [empty_t] * fill
                + [pairs[i].rejected.tokens for i in group] + [empty_t] * fill)
        msks = ([pairs[i].chosen.loss_mask for i in group] + [empty_m] * fill
                + [pairs[i].rejected.loss_mask for i in group] + [empty_m] * fill)
        parts.append(batching.pad_batch(seqs, msks, length, pad_id))
        for j, i in enumerate(group):
            masks[a, j] = masks[a, M + j] = 1.0
            if ref is not None:
                refs[a, j], refs[a, M + j] = ref[0][i], ref[1][i]
    out = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    out["ref_logps"], out["pair_mask"] = refs, masks
    return out


def batch_layout(batch_pairs: int, micro_pairs: int) -> dict[str, np.ndarray]:
    """Zero arrays with ``make_batch``'s keys and layout (length 1): what the step's pinned
    shardings are computed from."""
    A, M = batch_pairs // micro_pairs, micro_pairs
    rows = {k: np.zeros((A, 2 * M, 1), np.int32) for k in ("tokens", "positions", "segment_ids")}
    return {**rows, "loss_mask": np.zeros((A, 2 * M, 1), bool), "ref_logps": np.zeros((A, 2 * M), np.float32),
            "pair_mask": np.zeros((A, 2 * M), np.float32)}


# ---------------------------------------------------------------------------------------------
# The step

METRIC_SUMS = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
               "logps/chosen", "logps/rejected")


def policy_logps(graphdef, params, mb) -> jax.Array:
    """Sequence log-probs [2M] of a micro-batch's rows."""
    logits = model_lib.apply(graphdef, params, mb["tokens"], mb["positions"], mb["segment_ids"])
    return sequence_logps(logits, mb["tokens"], mb["loss_mask"])[0]


def pair_sums(logps_2M: jax.Array, ref_2M: jax.Array, pair_mask_2M: jax.Array, beta: float):
    """(loss sum, metric sums) of a micro-batch's pairs: the rows' log-probs [2M] (chosen, then
    rejected), their reference log-probs and pair mask in the same layout. Rewards and
    accuracy are TRL's: ``beta * (policy - reference)``, and chosen reward > rejected reward."""
    M = logps_2M.shape[0] // 2
    w = pair_mask_2M[:M]
    (s, c), (rc, rr) = dpo_loss(logps_2M[:M], logps_2M[M:], ref_2M[:M], ref_2M[M:], beta, w)
    sums = {"count": c, "rewards/chosen": (rc * w).sum(), "rewards/rejected": (rr * w).sum(),
            "rewards/accuracy": ((rc > rr) * w).sum(), "rewards/margin": ((rc - rr) * w).sum(),
            "logps/chosen": (logps_2M[:M] * w).sum(), "logps/rejected": (logps_2M[M:] * w).sum()}
    return s, sums


def make_logps_fn(graphdef):
    """jitted ``(params, batch [1, 2M, T]) -> log-probs [2M]``: the reference pass."""
    return jax.jit(lambda params, batch: policy_logps(graphdef, params, jax.tree.map(lambda x: x[0], batch)))


def make_train_step(graphdef, tx: optax.GradientTransformation, beta: float, live_reference: bool = False,
                    shardings=None):
    """``step(state, batch) -> (state, metrics)``, jitted, donating ``state``.

    batch arrays are [A, 2M, T] (see ``make_batch``); the gradients of the summed loss of the
    A micro-batches are accumulated and divided once by the number of pairs. With
    ``live_reference`` the step is ``step(state, batch, ref_params)`` and computes the
    reference log-probs itself (benchmarks and tests; training uses the cache). ``shardings``
    (cached reference only): as in ``train_step.make_train_step``.
    """

    def loss_fn(params, mb, ref_params):
        logps = policy_logps(graphdef, params, mb)
        if ref_params is None:
            ref = mb["ref_logps"]
        else:
            ref = jax.lax.stop_gradient(policy_logps(graphdef, ref_params, mb))
        return pair_sums(logps, ref, mb["pair_mask"], beta)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch, ref_params=None):
        params = state["params"]

        def micro(carry, mb):
            g_acc, s_acc, m_acc = carry
            (s, sums), g = grad_fn(params, mb, ref_params)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, jax.tree.map(jnp.add, m_acc, sums)), None

        if batch["tokens"].shape[0] == 1:  # no accumulation: no zero-filled gradient buffer
            (s, sums), g = grad_fn(params, jax.tree.map(lambda x: x[0], batch), ref_params)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("count",) + METRIC_SUMS}
            (g, s, sums), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32), zero_sums), batch)
        denom = jnp.maximum(sums["count"], 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        updates, opt_state = tx.update(g, state["opt_state"], params)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": s / denom, **{k: sums[k] / denom for k in METRIC_SUMS}, "pairs": sums["count"],
                   "grad_norm": optax.global_norm(g), "lr": optim.current_lr(opt_state)}
        return new, metrics

    if live_reference:
        return jax.jit(step, donate_argnums=0)
    return train_step.jit_step(lambda state, batch: step(state, batch), shardings)


def make_eval_fn(graphdef):
    """jitted ``(params, batch [A, 2M, T]) -> log-probs [A, 2M]``: the policy's sequence
    log-probs in the batch's layout, with no gradient (the held-out evaluation)."""
    return jax.jit(lambda params, batch: jax.lax.map(lambda mb: policy_logps(graphdef, params, mb), batch))


def pair_logps(eval_fn, params, pairs: Sequence[PairExample], batch_pairs: int, micro_pairs: int, pad_id: int,
               put=lambda b: b) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [N], rejected [N]) log-probs of ``pairs`` from ``eval_fn`` in one fixed layout
    (batches of ``batch_pairs`` in order of length, ``micro_pairs`` per forward), so that two
    calls differ only by their params: at the reference's params the rewards are exactly 0."""
    M = micro_pairs
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i]), i))
    chunks = [order[k:k + batch_pairs] for k in range(0, len(order), batch_pairs)]
    host = sharding.to_host([eval_fn(params, put(make_batch(pairs, idx, batch_pairs, M, pad_id))) for idx in chunks])
    chosen, rejected = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
    for idx, lp_A2M in zip(chunks, host):
        for p, i in enumerate(idx):
            a, j = divmod(p, M)
            chosen[i], rejected[i] = lp_A2M[a, j], lp_A2M[a, M + j]
    return chosen, rejected


def pair_metrics(logps: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], beta: float) -> dict:
    """Mean DPO loss, reward accuracy and margin of N pairs from their (chosen, rejected)
    log-probs and reference log-probs, by ``pair_sums``."""
    n = len(logps[0])
    s, sums = pair_sums(jnp.concatenate([jnp.asarray(logps[0]), jnp.asarray(logps[1])]),
                        jnp.concatenate([jnp.asarray(ref[0]), jnp.asarray(ref[1])]), jnp.ones(2 * n), beta)
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(s) / count, "reward_accuracy": float(sums["rewards/accuracy"]) / count,
            "margin": float(sums["rewards/margin"]) / count}


def evaluate_pairs(eval_fn, params, pairs: Sequence[PairExample], ref: tuple[np.ndarray, np.ndarray], beta: float,
                   batch_pairs: int, micro_pairs: int, pad_id: int, put=lambda b: b) -> dict:
    """Mean DPO loss, reward accuracy and margin over ``pairs`` against their reference
    log-probs ``ref``, the policy's log-probs taken in ``pair_logps``'s layout."""
    return pair_metrics(pair_logps(eval_fn, params, pairs, batch_pairs, micro_pairs, pad_id, put), ref, beta)
