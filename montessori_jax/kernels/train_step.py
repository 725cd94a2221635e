"""The SFT train step: one jitted program over a global batch ``[A, M, T]`` (A micro-batches
of M rows of T tokens, see ``core.batching.global_batch``) that scans the micro-batches,
accumulates the gradients of the summed token loss, divides once by the global target count
(the exact token mean) and applies the optimizer; the state is donated. The DPO step
(``kernels.dpo``) has the same shape with its own loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from montessori_jax.core import model as model_lib
from montessori_jax.core import optim, sharding
from montessori_jax.core.losses import batch_token_nll


def make_train_step(graphdef, tx: optax.GradientTransformation, shardings=None):
    """``step(state, batch) -> (state, metrics)``, jitted, donating ``state``.

    batch arrays are [A, M, T]: A micro-batches whose gradients of the *summed* token loss are
    accumulated, then divided once by the global target count (exact token mean).
    ``shardings``: (state's, batch's) from ``step_shardings``, pinned as the program's input
    and output shardings (metrics replicated) rather than left to propagation.
    """

    def loss_sum(params, mb):
        logits = model_lib.apply(graphdef, params, mb["tokens"], mb["positions"], mb["segment_ids"])
        return batch_token_nll(logits, mb["tokens"], mb["loss_mask"])

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state, batch):
        params = state["params"]

        def micro(carry, mb):
            g_acc, s_acc, c_acc = carry
            (s, c), g = grad_fn(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, c_acc + c), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (g, s, c), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
        denom = jnp.maximum(c, 1.0)
        g = jax.tree.map(lambda x: x / denom, g)
        updates, opt_state = tx.update(g, state["opt_state"], params)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": s / denom, "tokens": c, "grad_norm": optax.global_norm(g),
                   "lr": optim.current_lr(opt_state)}
        return new, metrics

    return jit_step(step, shardings)


def jit_step(step, shardings=None):
    """``jax.jit(step)`` donating the state; with ``shardings`` = (state's, batch's), the
    state comes back with the shardings it came in with and the metrics replicated."""
    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    state_sh, batch_sh = shardings
    mesh = next(s.mesh for s in jax.tree.leaves(state_sh) if isinstance(s, NamedSharding))
    return jax.jit(step, donate_argnums=0, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, NamedSharding(mesh, P())))


def step_shardings(state, mesh, rules, batch) -> tuple:
    """(the state's shardings as placed, ``batch_shardings`` of a batch of this run's layout):
    what ``make_train_step`` pins. The batch's length does not matter, only its layout."""
    return jax.tree.map(lambda x: x.sharding, state), batch_shardings(mesh, rules, batch)


def init_state(params: dict, tx: optax.GradientTransformation) -> dict:
    mesh = sharding.mesh_of(params)
    step = jnp.zeros((), jnp.int32) if mesh is None else sharding.put(np.zeros((), np.int32), sharding.replicated(mesh))
    return {"params": params, "opt_state": jax.jit(tx.init)(params), "step": step}


def batch_shardings(mesh, rules, batch) -> dict:
    """[A, M, T]: the micro-batch axis over the data-parallel mesh axes when it divides."""
    axes = rules.get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out = {}
    for k, v in batch.items():
        spec = P(None, axes if (n > 1 and v.shape[1] % n == 0) else None, *([None] * (v.ndim - 2)))
        out[k] = NamedSharding(mesh, spec)
    return out
