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
    nll_BT, mask_BT = token_nll_per_position(logits_BTV, tokens_BT, loss_mask_BT)
    return nll_BT.sum(-1), mask_BT.sum(-1)


def batch_token_nll(logits_BTV, tokens_BT, loss_mask_BT):
    """(nll_sum, count) over the whole batch: the token mean is their ratio, taken once."""
    s, c = token_nll(logits_BTV, tokens_BT, loss_mask_BT)
    return s.sum(), c.sum()


def token_nll_per_position(logits_BTV: jax.Array, tokens_BT: jax.Array, loss_mask_BT: jax.Array):
    """Per-target NLL [B, T-1] in fp32 (0 where the mask is off), and the mask as fp32."""
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    mask_BT = loss_mask_BT[:, 1:].astype(jnp.float32)
    return -logp_BT * mask_BT, mask_BT
