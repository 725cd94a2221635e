"""Token losses, returned as (sum, count) so that micro-batches and chunks combine into the
exact token mean over everything: ``sum(sums) / sum(counts)``, never a mean of means."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BTV: jax.Array, tokens_BT: jax.Array, loss_mask_BT: jax.Array):
    """Per-example next-token NLL over the masked targets.

    ``loss_mask_BT[b, t]`` is True when token t is a target (predicted from tokens < t), so
    position t-1's logits score token t. Returns (nll_sum_B, count_B) in fp32.
    """
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    targets_BT = tokens_BT[:, 1:]
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    mask_BT = loss_mask_BT[:, 1:].astype(jnp.float32)
    return -(logp_BT * mask_BT).sum(-1), mask_BT.sum(-1)


def mean_token_nll(logits_BTV, tokens_BT, loss_mask_BT):
    """(sum, count) over the whole batch."""
    s, c = token_nll(logits_BTV, tokens_BT, loss_mask_BT)
    return s.sum(), c.sum()
