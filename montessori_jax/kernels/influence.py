"""Local data influence (step 3 of the method), batched.

For a probing example z and the student's warm state (params theta, AdamW moments, step):

    L_ref(theta)   token-mean NLL over the response tokens of all of D_ref
    theta_z        one AdamW step on z alone from the warm state (fp32 update math)
    influence(z) = L_ref(theta) - L_ref(theta_z)        positive: z helps

Exact: B examples at a time through ``jax.vmap`` of (one-step update, reference loss under the
updated params) in one compiled program; D_ref streams through fixed-shape chunks with
``lax.scan`` so memory does not grow with |D_ref|.

First order: g_ref = grad L_ref(theta) once; per example the AdamW update delta_z (nonlinear in
z's gradient, so computed per example, vmapped); influence ~= -<g_ref, delta_z>.

The original code reloads the checkpoint from disk after every example; here the warm state
is read once and every example's update is a pure function of it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from montessori_jax.config import InfluenceConfig
from montessori_jax.core import batching, optim, text
from montessori_jax.core import model as model_lib
from montessori_jax.core.losses import batch_token_nll

# ---------------------------------------------------------------------------------------------
# The one AdamW step, as optax.adamw (+ clip_by_global_norm) computes it, on explicit state


@dataclasses.dataclass(frozen=True)
class AdamHP:
    """The warm-up optimizer's AdamW hyperparameters, and the lr and gradient clipping of the
    influence step (its own: the original clips in the warm-up, not in the one step)."""

    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_norms: bool = False
    grad_clip: float | None = None

    @classmethod
    def from_warm_state(cls, warm: dict, lr: float | None = None, grad_clip: float | None = None) -> "AdamHP":
        """``lr``: null takes warm_state.json's lr; ``grad_clip``: influence.grad_clip (null: none)."""
        return cls(lr=warm["lr"] if lr is None else lr, b1=warm["b1"], b2=warm["b2"], eps=warm["eps"],
                   weight_decay=warm["weight_decay"], decay_norms=warm["decay_norms"], grad_clip=grad_clip)


def adamw_update(params: dict, grads: dict, mu: dict, nu: dict, count, hp: AdamHP, lr=None) -> dict:
    """delta = theta_z - theta for one AdamW step from (mu, nu, count), in fp32 (``lr``, when
    given, may be traced: one compiled program then serves every lr)."""
    lr = hp.lr if lr is None else lr
    grads = {k: g.astype(jnp.float32) for k, g in grads.items()}
    if hp.grad_clip is not None:
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads.values()))
        scale = jnp.where(norm < hp.grad_clip, 1.0, hp.grad_clip / norm)
        grads = {k: g * scale for k, g in grads.items()}
    return {k: _adamw_delta(k, params[k], g, mu[k], nu[k], count, hp, lr) for k, g in grads.items()}


def _adamw_delta(name: str, param, g, mu, nu, count, hp: AdamHP, lr):
    """One tensor's AdamW step (``g`` in fp32, clipped already): the one formula of
    ``adamw_update`` and the fused first-order hook."""
    t = (count + 1).astype(jnp.float32)
    m = hp.b1 * mu + (1 - hp.b1) * g
    v = hp.b2 * nu + (1 - hp.b2) * g * g
    step = (m / (1 - hp.b1**t)) / (jnp.sqrt(v / (1 - hp.b2**t)) + hp.eps)
    if hp.weight_decay and (hp.decay_norms or optim.decays(name)):
        step = step + hp.weight_decay * param.astype(jnp.float32)
    return -lr * step


def apply_delta(params: dict, delta: dict, param_dtype) -> dict:
    """theta + delta on fp32 master weights, then held in ``param_dtype`` (bf16: the probe)."""
    return {k: (params[k].astype(jnp.float32) + delta[k]).astype(param_dtype) for k in params}


# ---------------------------------------------------------------------------------------------
# Reference set: fixed-shape chunks, grouped by padded length


@dataclasses.dataclass
class RefSet:
    """D_ref as a tuple of stacks, each [n_chunks, rows, T] for one padded length T."""

    groups: tuple  # of dicts tokens/positions/segment_ids/loss_mask
    n_rows: int
    n_tokens: int


def ref_rows_per_chunk(value: int | None, data: int = 1) -> int:
    """influence.ref_batch_size, resolved: null is 1 on a CPU and 4 on an accelerator, rounded up
    to a multiple of the mesh's ``data`` size so that grad L_ref's chunks split over it. (SmolLM2,
    the first 16 reference rows, one fp32 pass on a 2-core CPU: 20-23 s a row at a time against
    22-25 s four at a time, at the same padding.)"""
    if value is not None:
        return value
    rows = 1 if jax.default_backend() == "cpu" else 4
    return -(-rows // data) * data


def make_ref_set(examples: Sequence[text.Example], rows_per_chunk: int, pad_id: int,
                 max_lengths: int = InfluenceConfig.ref_max_lengths) -> RefSet:
    """D_ref sorted by length in chunks of ``rows_per_chunk`` rows, each padded to one of at most
    ``max_lengths`` lengths planned for the least padding (``batching.plan_lengths``): one group
    (one scan body of the compiled programs) per length."""
    rows = batching.rows_from_examples(examples)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    lengths = batching.plan_lengths([len(r) for r in rows], rows_per_chunk, max_lengths)
    by_len: dict[int, list] = {}
    for start in range(0, len(order), rows_per_chunk):
        chunk = [rows[i] for i in order[start:start + rows_per_chunk]]
        T = batching.bucket_length(max(len(r) for r in chunk), lengths)
        by_len.setdefault(T, []).append(batching.pad_rows(chunk, rows_per_chunk, T, pad_id))
    groups = tuple({k: np.stack([c[k] for c in chunks]) for k in chunks[0]} for _, chunks in sorted(by_len.items()))
    n_tokens = int(sum(e.loss_mask[1:].sum() for e in examples))
    return RefSet(groups, len(examples), n_tokens)


def ref_token_nll(graphdef, params: dict, groups) -> tuple:
    """The per-token NLL of every D_ref target under ``params``: one [chunks, rows, T-1] array
    per group. Computed once for the warm params, it is the baseline each example's per-token
    NLL is compared against."""

    def chunk(_, b):
        return None, model_lib.apply_nll(graphdef, params, b["tokens"], b["positions"], b["segment_ids"],
                                         b["loss_mask"])[0]

    return tuple(jax.lax.scan(chunk, None, g)[1] for g in groups)


def ref_loss_drop(graphdef, params: dict, groups, base_nll: tuple) -> jax.Array:
    """L_ref(theta) - L_ref(params) as the mean of per-token differences.

    Summing the differences token by token (each about lr-sized) instead of subtracting two
    sums of O(1) NLLs keeps fp32 resolution: the two whole-set means differ by less than one
    ulp of L_ref (~5e-7 at L_ref ~ 6) for small steps, the per-token differences do not.
    """

    def chunk(carry, xs):
        b, base = xs
        nll, mask = model_lib.apply_nll(graphdef, params, b["tokens"], b["positions"], b["segment_ids"], b["loss_mask"])
        return (carry[0] + jnp.sum((base - nll) * mask), carry[1] + mask.sum()), None

    total = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    for g, base in zip(groups, base_nll):
        total, _ = jax.lax.scan(chunk, total, (g, base))
    return total[0] / total[1]


def example_grads(graphdef, params: dict, ex: dict) -> dict:
    """Gradient of z's token-mean loss (a batch of one, as a one-example training step)."""

    def loss(p):
        logits = model_lib.apply(graphdef, p, ex["tokens"][None], ex["positions"][None], ex["segment_ids"][None])
        s, c = batch_token_nll(logits, ex["tokens"][None], ex["loss_mask"][None])
        return s / jnp.maximum(c, 1.0)

    return jax.grad(loss)(params)


# ---------------------------------------------------------------------------------------------
# The compiled programs

# their phases, as ``jax.named_scope`` names in a profile's trace
PHASES = ("example_gradient", "adamw_update", "reference_pass")


def make_exact(graphdef, hp: AdamHP, param_dtype=jnp.float32):
    """jit(params, mu, nu, count, probes [B, T], ref groups, base_nll, lr)
    -> (influence [B], unchanged [B]).

    ``base_nll``: ``make_baseline``'s per-token NLL under the warm params (held in the same
    ``param_dtype``). ``unchanged``: the fraction of weights the step left bit-identical (the
    bf16 probe). A batch of one example runs the same function without ``vmap``.
    """

    def one(params, mu, nu, count, ex, groups, base_nll, lr):
        with jax.named_scope(PHASES[0]):
            grads = example_grads(graphdef, params, ex)
        with jax.named_scope(PHASES[1]):
            delta = adamw_update(params, grads, mu, nu, count, hp, lr)
            new = apply_delta(params, delta, param_dtype)
        with jax.named_scope(PHASES[2]):
            drop = ref_loss_drop(graphdef, new, groups, base_nll)
        same = sum(jnp.sum(new[k] == params[k].astype(param_dtype)) for k in params)
        total = sum(v.size for v in params.values())
        return drop, same / total

    batched = jax.vmap(one, in_axes=(None, None, None, None, 0, None, None, None))

    def run(params, mu, nu, count, probes, groups, base_nll, lr):
        if probes["tokens"].shape[0] == 1:
            # one example (B=1, the CPU default): no vmap. Under vmap theta_z's layer stacks
            # carry a batch axis of 1, and XLA:CPU copies whole stacks into the program's loops
            # (the reference groups' scans among them): SmolLM2 with 8 groups, 3.05 GB of
            # copies in the compiled program (loop bodies counted once), 0.48 GB without vmap
            ex = jax.tree.map(lambda x: x[0], probes)
            return jax.tree.map(lambda x: x[None], one(params, mu, nu, count, ex, groups, base_nll, lr))
        return batched(params, mu, nu, count, probes, groups, base_nll, lr)

    return jax.jit(run)


def make_baseline(graphdef, param_dtype=jnp.float32):
    """jit(params, ref groups) -> (L_ref(theta), per-token NLL) with params held in
    ``param_dtype``."""

    def base(params, groups):
        held = {k: v.astype(param_dtype) for k, v in params.items()}
        with jax.named_scope(PHASES[2]):
            nll = ref_token_nll(graphdef, held, groups)
        count = sum(g["loss_mask"][..., 1:].sum() for g in groups)
        return sum(x.sum() for x in nll) / count, nll

    return jax.jit(base)


def make_ref_grad(graphdef, remat: bool = True):
    """jit(params, ref groups) -> (L_ref, grad L_ref), the gradient streamed chunk by chunk.

    ``remat``: recompute each layer's activations in the backward pass (see ``plan_ref_grad``,
    which picks it and the chunk size from a memory estimate).
    """

    def f(params, groups):
        (s, c), g = _sum_and_grad(graphdef, params, groups, remat)
        return s / c, jax.tree.map(lambda x: x / c, g)

    return jax.jit(f)


def _with_remat(graphdef, params, remat: bool):
    """The same decoder with every layer rematerialized in the backward pass (or not)."""
    cfg = model_lib.merge_params(graphdef, params).cfg
    if cfg.remat == remat:
        return graphdef
    return model_lib.split_params(model_lib.abstract(dataclasses.replace(cfg, remat=remat)))[0]


def _sum_and_grad(graphdef, params, groups, remat: bool = True):
    """((sum, count), grad of sum): one backward per chunk, accumulated in the scan carry."""
    graphdef = _with_remat(graphdef, params, remat)

    def chunk(carry, b):
        def loss(p):
            logits = model_lib.apply(graphdef, p, b["tokens"], b["positions"], b["segment_ids"])
            return batch_token_nll(logits, b["tokens"], b["loss_mask"])

        (s, c), g = jax.value_and_grad(loss, has_aux=True)(params)
        s_acc, c_acc, g_acc = carry
        return (s_acc + s, c_acc + c, jax.tree.map(jnp.add, g_acc, g)), None

    carry = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params))
    for g in groups:
        carry, _ = jax.lax.scan(chunk, carry, g)
    s, c, grad = carry
    return (s, c), grad


def make_first_order(graphdef, hp: AdamHP, fused: bool | None = None):
    """jit(params, mu, nu, count, probes [B, T], g_ref, lr) -> predicted influence [B].

    ``fused`` (default: whenever the step does not clip): each decoder layer's gradient is
    turned into its AdamW update and dotted with grad L_ref inside the backward pass, as soon
    as the layer's gradient exists (``_first_order_hook``), so no example's whole gradient or
    update is ever held: per example only the layers outside the stack (embedding, final norm,
    head) have their gradient materialised. Clipping needs the whole gradient's norm first,
    so it takes the plain path: the example's gradient, its update, the dot.
    """
    if fused is None:
        fused = hp.grad_clip is None
    if fused and hp.grad_clip is not None:
        raise ValueError("the fused first-order program cannot clip (the clip needs the whole gradient's norm)")
    if fused:
        return jax.jit(jax.vmap(_fused_first_order(graphdef, hp), in_axes=(None, None, None, None, 0, None, None)))

    def one(params, mu, nu, count, ex, g_ref, lr):
        with jax.named_scope(PHASES[0]):
            grads = example_grads(graphdef, params, ex)
        with jax.named_scope(PHASES[1]):
            delta = adamw_update(params, grads, mu, nu, count, hp, lr)
        with jax.named_scope("first_order_dot"):
            return -sum(jnp.vdot(g_ref[k], delta[k]) for k in params)

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, None, 0, None, None)))


def _first_order_hook(hp: AdamHP):
    """hook(p, (mu, nu, g_ref, probe), count, lr) -> p, the identity on one layer's params whose
    backward pass, given the layer's gradient g, returns -<g_ref, AdamW delta(g)> for that layer
    as the cotangent of the scalar ``probe`` (and nothing for the rest: they are not
    differentiated). Differentiating the loss with respect to the layers' probes thus yields
    each layer's first-order term, the layer's gradient consumed where it is made."""

    @jax.custom_vjp
    def hook(p, side, count, lr):
        return p

    def fwd(p, side, count, lr):
        return p, (p, side, count, lr)

    def bwd(res, g):
        p, (mu, nu, g_ref, _), count, lr = res
        with jax.named_scope(PHASES[1]):
            term = -sum(jnp.vdot(g_ref[k], _adamw_delta(k, p[k], g[k].astype(jnp.float32), mu[k], nu[k], count, hp, lr))
                        for k in p)
        zeros = jax.tree.map(jnp.zeros_like, (p, (mu, nu, g_ref)))
        return zeros[0], (*zeros[1], term), jnp.zeros_like(count), jnp.zeros_like(lr)

    hook.defvjp(fwd, bwd)
    return hook


def _fused_first_order(graphdef, hp: AdamHP):
    hook = _first_order_hook(hp)
    layer_names = model_lib.Llama.LAYER_PARAMS

    def one(params, mu, nu, count, ex, g_ref, lr):
        lr = jnp.asarray(lr, jnp.float32)
        outer = {k: v for k, v in params.items() if k not in layer_names}
        n_layers = params[layer_names[0]].shape[0]
        side = tuple({k: t[k] for k in layer_names} for t in (mu, nu, g_ref))

        def loss(outer_params, probes):
            extras = (*side, probes)
            logits = model_lib.apply(graphdef, {**params, **outer_params}, ex["tokens"][None], ex["positions"][None],
                                     ex["segment_ids"][None], layer_hook=lambda p, e: hook(p, e, count, lr),
                                     layer_extras=extras)
            s, c = batch_token_nll(logits, ex["tokens"][None], ex["loss_mask"][None])
            return s / jnp.maximum(c, 1.0)

        with jax.named_scope(PHASES[0]):
            g_outer, layer_terms = jax.grad(loss, argnums=(0, 1))(outer, jnp.zeros((n_layers,), jnp.float32))
        with jax.named_scope(PHASES[1]):
            delta = adamw_update(outer, g_outer, mu, nu, count, hp, lr)
        with jax.named_scope("first_order_dot"):
            return layer_terms.sum() - sum(jnp.vdot(g_ref[k], delta[k]) for k in outer)

    return one


def make_phase_programs(graphdef, hp: AdamHP, param_dtype=jnp.float32) -> dict:
    """The kernel's phases for one example, each its own jitted program (for timing them apart,
    as ``--profile`` does): name -> (fn, which earlier outputs it takes).

    example_gradient(params, ex) -> grads; adamw_update(params, grads, mu, nu, count, lr) ->
    theta_z; reference_pass(theta_z, groups, base_nll) -> influence.
    """

    def update(params, grads, mu, nu, count, lr):
        return apply_delta(params, adamw_update(params, grads, mu, nu, count, hp, lr), param_dtype)

    return {
        PHASES[0]: jax.jit(lambda params, ex: example_grads(graphdef, params, ex)),
        PHASES[1]: jax.jit(update),
        PHASES[2]: jax.jit(lambda new, groups, base_nll: ref_loss_drop(graphdef, new, groups, base_nll)),
    }
