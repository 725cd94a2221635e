"""One Llama-family decoder in Flax NNX, for teacher and student alike.

Covers Llama 2/3, TinyLlama and SmolLM2: token embedding, RMSNorm, RoPE (with the Llama 3.1
``llama3`` frequency scaling), grouped-query attention, SwiGLU MLP, tied or untied head.

Decoder layers are stacked on a leading ``layers`` axis and run with ``lax.scan`` (optionally
rematerialised), so compile time does not grow with depth. Every parameter carries logical
axis names (see ``sharding.py`` for how they map onto a mesh).

Dimension letters used in names:
  B batch, T query length, S key length, D d_model, F ffn, V vocab,
  H query heads, K kv heads, G query heads per kv head, E head_dim, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from montessori_jax.core import losses
from montessori_jax.core.compat import logical_axes_of, make_param

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 ``rope_type: llama3`` frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (no tokens, files or training here)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None  # default d_model // n_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits are fp32
    remat: bool = False

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {sorted(DTYPES)}")

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP, its two norms)."""
        d, f, e = self.d_model, self.ffn_dim, self.hd
        return d * e * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * d * f + 2 * d

    def num_params(self) -> int:
        d = self.d_model
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * self.layer_params() + d + head



# Shapes of the models this project names (``montessori plan --model-shape``, random-weight
# benchmarks): the architecture only, no weights.
SHAPES: dict[str, dict] = {
    # SmolLM2-135M-Instruct: the embedded default (tied head)
    "smollm2-135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         rope_theta=100000.0, tie_embeddings=True, max_position_embeddings=8192),
    # TinyLlama 1.1B: the 1B-class student of the paper
    "tinyllama": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                      max_position_embeddings=2048),
    # Llama-3-8B (and -Instruct): the paper's teacher and its large student
    "llama3-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      rope_theta=500000.0, max_position_embeddings=8192),
    # a few MB: for trying commands
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 max_position_embeddings=1024),
}

# ---------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies of the rotary embedding, shape [E/2], fp32."""
    e = cfg.hd
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    blend = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - blend) * inv_freq / s.factor + blend * inv_freq
    out = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(medium, blended, out)


def apply_rope(x_BTNE: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate halves (the HF Llama convention): x*cos + rotate_half(x)*sin, in fp32."""
    angles_BTE2 = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BTE2)[:, :, None, :]
    sin = jnp.sin(angles_BTE2)[:, :, None, :]
    x = x_BTNE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNE.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(dtype)


# ---------------------------------------------------------------------------------------------
# KV cache


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """A fixed-size KV cache: k, v [L, B, S, K, E]; ``valid`` [B, S] marks written real tokens.

    A cache may also hold a read-only ``prefix`` (another such cache, of b rows with B a
    multiple of b): row r then attends first to prefix row ``r // (B // b)``'s valid slots, then
    to its own. n samples of one prompt share the prompt's keys and values this way instead of
    holding n copies (the sampler), so a decode step reads the prompt's cache once per prompt."""
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.hd)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, max_len), jnp.bool_),
    }


# ---------------------------------------------------------------------------------------------
# The decoder

HEAD_VOCAB_BLOCK = 8192  # vocabulary entries per block of ``Llama.head_nll``


class Llama(nnx.Module):
    """Llama decoder. ``__call__`` is the only forward; it is pure given the params."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, e, h, k, n = cfg.d_model, cfg.ffn_dim, cfg.hd, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers
        pdt = DTYPES[cfg.param_dtype]
        normal = jax.nn.initializers.normal

        def param(shape, axes, init, fan_in=None):
            key = rngs.params()
            std = 0.02 if fan_in is None else 1.0 / math.sqrt(fan_in)
            value = jnp.ones(shape, pdt) if init == "ones" else normal(std)(key, shape, pdt)
            return make_param(value, axes)

        self.embed = param((cfg.vocab_size, d), ("vocab", "embed"), "normal")
        self.attn_norm = param((n, d), ("layers", "norm"), "ones")
        self.wq = param((n, d, h, e), ("layers", "embed", "heads", "head_dim"), "normal", d)
        self.wk = param((n, d, k, e), ("layers", "embed", "kv_heads", "head_dim"), "normal", d)
        self.wv = param((n, d, k, e), ("layers", "embed", "kv_heads", "head_dim"), "normal", d)
        self.wo = param((n, h, e, d), ("layers", "heads", "head_dim", "embed"), "normal", h * e)
        self.mlp_norm = param((n, d), ("layers", "norm"), "ones")
        self.w_gate = param((n, d, f), ("layers", "embed", "mlp"), "normal", d)
        self.w_up = param((n, d, f), ("layers", "embed", "mlp"), "normal", d)
        self.w_down = param((n, f, d), ("layers", "mlp", "embed"), "normal", f)
        self.final_norm = param((d,), ("norm",), "ones")
        if not cfg.tie_embeddings:
            self.lm_head = param((d, cfg.vocab_size), ("embed", "vocab"), "normal", d)

    # The per-layer weights, stacked on axis 0, as a dict the scan walks over.
    LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")

    def head(self, h_xD: jax.Array) -> jax.Array:
        """The LM head on final hidden states [..., D]: logits [..., V], accumulated and returned
        in fp32. A tied head contracts against the embedding as stored ([V, D]), so XLA never
        materialises its transpose."""
        lead, h_ND = h_xD.shape[:-1], h_xD.reshape(-1, h_xD.shape[-1])
        with jax.named_scope("lm_head"):
            logits = self._head_logits(h_ND, 0, self.cfg.vocab_size)
            return logits.reshape(*lead, logits.shape[-1])

    def _head_logits(self, h_ND: jax.Array, v0: int, v1: int) -> jax.Array:
        """The logits [N, v1 - v0] of vocabulary entries [v0, v1), in fp32."""
        dt = DTYPES[self.cfg.dtype]
        if not self.cfg.tie_embeddings:
            return matmul(h_ND, self.lm_head[:, v0:v1].astype(dt))
        if dt == jnp.bfloat16 and jax.default_backend() == "cpu" and h_ND.shape[0] >= 256:
            # XLA:CPU's fast bf16 matmul needs the [D, V] operand row-major; the transpose
            # (V x D elements) pays for itself over many tokens, not in a decode step's few
            return matmul(h_ND, physical_transpose(self.embed[v0:v1].astype(dt)))
        return jax.lax.dot_general(h_ND.astype(dt), self.embed[v0:v1].astype(dt), (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    def head_nll(self, h_BTD: jax.Array, tokens_BT: jax.Array, loss_mask_BT: jax.Array,
                 block: int = HEAD_VOCAB_BLOCK):
        """``losses.token_nll_per_position(self.head(h), tokens, loss_mask)`` without one [B, T, V]
        logits array: the head in blocks of ``block`` vocabulary entries with a running logsumexp, each
        target's logit read from the block that holds it. For passes that take no gradient (the
        influence kernel's reference passes).

        Each block's logits are written and read once, not the whole [T, V] twice, and the blocks'
        matmuls and reductions are independent ops a CPU runs side by side: SmolLM2 on a 2-core
        CPU, the forward and NLL of one 608-token row 1.55-1.60 -> 1.45-1.48 s (best of 8,
        interleaved). Not a memory saving: XLA:CPU schedules the blocks' matmuls together, so
        its peak is the whole logits' (temporaries 256 -> 258 MiB for 1024 tokens of a 65,536
        vocabulary), as ``influence_memory.forward_bytes`` counts them. The NLLs equal the
        unblocked ones up to fp32 rounding."""
        B, T, D = h_BTD.shape
        h_ND = h_BTD.reshape(-1, D)
        N, V = h_ND.shape[0], self.cfg.vocab_size
        next_N = losses.next_tokens(tokens_BT).reshape(N)
        with jax.named_scope("lm_head"):
            m_N = jnp.full((N,), -jnp.inf, jnp.float32)
            s_N = jnp.zeros((N,), jnp.float32)
            target_N = jnp.zeros((N,), jnp.float32)
            for v0 in range(0, V, block):
                v1 = min(V, v0 + block)
                logits = self._head_logits(h_ND, v0, v1)
                new_m = jnp.maximum(m_N, logits.max(axis=-1))
                s_N = s_N * jnp.exp(m_N - new_m) + jnp.exp(logits - new_m[:, None]).sum(axis=-1)
                m_N = new_m
                here = (next_N >= v0) & (next_N < v1)
                picked = jnp.take_along_axis(logits, jnp.clip(next_N - v0, 0, v1 - v0 - 1)[:, None], axis=-1)[:, 0]
                target_N = jnp.where(here, picked, target_N)
            lse_BT = (m_N + jnp.log(s_N)).reshape(B, T)
        return losses.nll_per_position(lse_BT, target_N.reshape(B, T), loss_mask_BT)

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
        return_hidden: bool = False,
        layer_hook=None,
        layer_extras=None,
    ):
        """Logits [B, T, V] in fp32 (or final hidden states with ``return_hidden``).

        positions_BT: the RoPE position of each token (explicit, so left padding and packing
            work). segment_ids_BT: 0 marks padding; attention stays within equal ids. Default:
            all ones (no padding).
        cache / cache_index: decode mode. The T new tokens are written into the cache at slots
            [cache_index, cache_index + T) for every row, then attend to every valid slot at or
            before their own. Returns (logits, new_cache).
        layer_hook / layer_extras: ``layer_hook(p, extras)`` maps each layer's params (a dict of
            ``LAYER_PARAMS``) before the layer uses them, ``extras`` that layer's slice of
            ``layer_extras`` (a pytree stacked on a leading ``layers`` axis). The identity in the
            forward pass, a hook can act on the layer's gradient in the backward one (the fused
            first-order influence, ``kernels.influence``).
        """
        cfg = self.cfg
        dt = DTYPES[cfg.dtype]
        B, T = tokens_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        inv_freq = rope_inv_freq(cfg)

        adt = activation_dtype(cfg)
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(adt)

        prefix = None if cache is None else cache.get("prefix")
        if cache is None:
            mask_BTS = None  # causal within a segment: ``causal_attention`` builds it per block
        else:
            S = cache["k"].shape[2]
            new_valid = segment_ids_BT != 0
            valid_BS = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, cache_index))
            slot_T = cache_index + jnp.arange(T)
            mask_BTS = (jnp.arange(S)[None, None, :] <= slot_T[None, :, None]) & valid_BS[:, None, :]

        layer_params = {name: getattr(self, name)[...] for name in self.LAYER_PARAMS}

        def block(x_BTD, p, kv, layer, pkv):
            """One decoder layer. kv: None, or the whole cache (k, v) [L, B, S, K, E] that this
            layer writes its T new slots into, in place (it rides in the scan's carry, so the
            decode loop never copies the cache). pkv: None, or this layer's prefix (k, v)
            [b, P, K, E], read only."""
            with jax.named_scope("attention"):  # names in profiles: attention, mlp, lm_head
                h_BTD = rms_norm(x_BTD, p["attn_norm"], cfg.rms_eps, adt)
                q = dense(h_BTD, p["wq"].astype(dt), 1)
                k = dense(h_BTD, p["wk"].astype(dt), 1)
                v = dense(h_BTD, p["wv"].astype(dt), 1)
                q = apply_rope(q, positions_BT, inv_freq)
                k = apply_rope(k, positions_BT, inv_freq)
                if kv is not None:
                    k_all, v_all = kv
                    at = (layer, 0, cache_index, 0, 0)
                    k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], at)
                    v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], at)
                    kv = (k_all, v_all)
                    k = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False).astype(adt)
                    v = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False).astype(adt)
                if kv is None:
                    attn = causal_attention(q, k, v, segment_ids_BT, cfg.n_kv_heads)
                elif pkv is None:
                    attn = attention(q, k, v, mask_BTS, cfg.n_kv_heads)
                else:
                    attn = attention_with_prefix(q, k, v, mask_BTS, pkv[0].astype(adt), pkv[1].astype(adt),
                                                 prefix["valid"], cfg.n_kv_heads)
                x_BTD = x_BTD + dense(attn, p["wo"].astype(dt), 2)
            with jax.named_scope("mlp"):
                h_BTD = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_eps, adt)
                gate = dense(h_BTD, p["w_gate"].astype(dt), 1)
                up = dense(h_BTD, p["w_up"].astype(dt), 1)
                x_BTD = x_BTD + dense(jax.nn.silu(gate) * up, p["w_down"].astype(dt), 1)
            return x_BTD, kv

        if cfg.remat:
            block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)

        def scan_body(carry, xs):
            x_BTD, kv = carry
            p, layer, pkv, extras = xs
            if layer_hook is not None:
                p = layer_hook(p, extras)
            x_BTD, kv = block(x_BTD, p, kv, layer, pkv)
            return (x_BTD, kv), None

        kv = None if cache is None else (cache["k"], cache["v"])
        pkv = None if prefix is None else (prefix["k"], prefix["v"])
        (x_BTD, kv), _ = jax.lax.scan(scan_body, (x_BTD, kv),
                                      (layer_params, jnp.arange(cfg.n_layers), pkv, layer_extras))

        h_BTD = rms_norm(x_BTD, self.final_norm[...], cfg.rms_eps, adt)
        out = h_BTD if return_hidden else self.head(h_BTD)
        if cache is None:
            return out
        new_cache = {"k": kv[0], "v": kv[1], "valid": valid_BS}
        if prefix is not None:
            new_cache["prefix"] = prefix
        return out, new_cache


def activation_dtype(cfg: LlamaConfig):
    """The dtype activations are held in between matmuls: the compute dtype, except fp32 for
    bf16 compute on a CPU backend. XLA:CPU has no native bf16 elementwise ops: it rewrites each
    bf16 op (a scan writing its bf16 residuals into the layer stack among them) to convert to
    fp32 and back, a whole-stack convert per layer that makes a 30-layer backward pass
    quadratic in depth. There bf16 is the operand dtype of the matmuls only (``matmul``)."""
    dt = DTYPES[cfg.dtype]
    if dt == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.float32
    return dt


def physical_transpose(m: jax.Array) -> jax.Array:
    """m [R, C] -> m.T [C, R], as a transpose XLA materialises rather than folding it into the
    consumer's layout (through a [r1, r2, C] view when R has a small power-of-two factor).

    XLA:CPU's fast bf16 matmul (fp32 result) takes only a plain row-major [N, K] x [K, M] dot;
    a transpose folded into a dot's dimension numbers or operand layout sends it to an fp32
    fallback about 5x slower (a [576, 2560] x [2560, 1536] weight gradient: 201 -> 873 GFLOP/s
    with this transpose, on a 2-core AMX Xeon)."""
    R, C = m.shape
    for r2 in (64, 32, 16, 8, 4, 2):
        if R % r2 == 0 and R > r2:
            return m.reshape(R // r2, r2, C).transpose(2, 0, 1).reshape(C, R)
    return m.T


@jax.custom_vjp
def _matmul_bf16(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [N, K] (any float dtype, cast to bf16) @ b [K, M] (bf16) with an fp32 result, every
    matmul of its gradient a plain row-major dot too (see ``physical_transpose``)."""
    return jnp.dot(a.astype(jnp.bfloat16), b, preferred_element_type=jnp.float32)


def _as_u16(x):
    # residuals ride in the layer scan's stacks as uint16: integer stacks are updated in place,
    # where XLA:CPU would convert a whole bf16 stack to fp32 and back at every layer
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def _matmul_bf16_fwd(a, b):
    # the residuals are the operands already transposed, in bf16: transposed here, where a was
    # just written, rather than in the backward pass, where XLA fuses the transpose with the
    # residual's slice out of the layer stack and reads it in column order (30x slower)
    # (the barrier keeps each transpose its own tiled copy, not fused into the stack's update)
    a_t, b_t = jax.lax.optimization_barrier((physical_transpose(a.astype(jnp.bfloat16)), physical_transpose(b)))
    return _matmul_bf16(a, b), (_as_u16(a_t), _as_u16(b_t), jnp.zeros((0,), a.dtype))


def _matmul_bf16_bwd(res, ct):
    a_t, b_t, a_like = res
    a_t = jax.lax.bitcast_convert_type(a_t, jnp.bfloat16)
    b_t = jax.lax.bitcast_convert_type(b_t, jnp.bfloat16)
    ct = ct.astype(jnp.bfloat16)
    da = jnp.dot(ct, b_t, preferred_element_type=jnp.float32)
    db = jnp.dot(a_t, ct, preferred_element_type=jnp.float32)
    return da.astype(a_like.dtype), db.astype(jnp.bfloat16)


_matmul_bf16.defvjp(_matmul_bf16_fwd, _matmul_bf16_bwd)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [N, K] @ b [K, M] in b's dtype (a is cast to it), accumulated and returned in fp32.
    bf16 on a CPU backend goes through ``_matmul_bf16`` (the fast path for the forward and the
    backward alike)."""
    if b.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return _matmul_bf16(a, b)
    return jnp.dot(a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def dense(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """x [..., *in] times w [*in, *out] -> [..., *out] (``n_in`` contracted axes), as one 2-D
    matmul over the flattened leading axes, accumulated in fp32 and returned in x's dtype.

    One [N, in] x [in, out] dot rather than an einsum with batch-like leading axes: XLA:CPU runs
    the 2-D form much faster, the backward pass above all (SmolLM2's MLP on 4 x 640 tokens: 61
    -> 43 ms forward, 259 -> 142 ms for the gradient), and its bf16 fast path (a plain dot with
    an fp32 result) applies only to this form."""
    lead, ins, outs = x.shape[:x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    k = math.prod(ins)
    y = matmul(x.reshape(-1, k), w.reshape(k, -1))
    return y.astype(x.dtype).reshape(*lead, *outs)


def attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, n_kv_heads: int) -> jax.Array:
    """Grouped-query attention with an fp32 softmax; returns [B, T, H, E]."""
    B, T, H, E = q_BTHE.shape
    G = H // n_kv_heads
    q_BTKGE = q_BTHE.reshape(B, T, n_kv_heads, G, E)
    logits_BKGTS = jnp.einsum("BTKGE,BSKE->BKGTS", q_BTKGE, k_BSKE).astype(jnp.float32)
    logits_BKGTS = logits_BKGTS / math.sqrt(E)
    big_neg = jnp.finfo(jnp.float32).min
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, big_neg)
    probs = jax.nn.softmax(logits_BKGTS, axis=-1)
    # a row with no valid key (a padded query) gets uniform probs; zero it for cleanliness
    probs = jnp.where(mask_BTS.any(-1)[:, None, None, :, None], probs, 0.0)
    out_BTKGE = jnp.einsum("BKGTS,BSKE->BTKGE", probs.astype(v_BSKE.dtype), v_BSKE)
    return out_BTKGE.reshape(B, T, H, E)


ATTENTION_BLOCK = 128  # query rows per block of ``causal_attention``


def _masked_softmax_attend(q_BKGTE, k_BKSE, v_BKSE, mask_BTS) -> jax.Array:
    """softmax(q k^T + mask) v with the normalisation after the value matmul (dividing [T, E],
    not [T, S]); q is pre-scaled. fp32 logits and softmax; a query with no valid key gets 0.
    Head-major operands [B, K, G, T, E] so both matmuls are plain batched dots."""
    logits = jnp.einsum("BKGTE,BKSE->BKGTS", q_BKGTE, k_BKSE, preferred_element_type=jnp.float32)
    logits = jnp.where(mask_BTS[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(logits - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("BKGTS,BKSE->BKGTE", p.astype(v_BKSE.dtype), v_BKSE, preferred_element_type=jnp.float32)
    return out / jnp.where(total > 0, total, 1.0)


def causal_attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, n_kv_heads: int,
                     block: int = ATTENTION_BLOCK) -> jax.Array:
    """Grouped-query causal attention within segments (0 marks padding, never attended to),
    for the full-sequence (no cache) forward; returns [B, T, H, E] in q's dtype.

    Queries go in blocks of ``block`` rows; block i meets only keys [0, end of block i), so the
    blocks above the diagonal, always masked, are never computed: about half the work of the
    square at long rows (on a 2-core CPU, 4 rows x 640 tokens of SmolLM2: 110 ms -> 40 ms a
    layer). The result equals ``attention`` with the causal segment mask up to rounding."""
    B, T, H, E = q_BTHE.shape
    K = n_kv_heads
    G = H // K
    q = (q_BTHE.astype(jnp.float32) / math.sqrt(E)).astype(q_BTHE.dtype)
    q = q.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, E]
    k = k_BTKE.transpose(0, 2, 1, 3)  # [B, K, S, E]
    v = v_BTKE.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, T, block):
        stop = min(T, start + block)
        seg_q, seg_k = segment_ids_BT[:, start:stop], segment_ids_BT[:, :stop]
        causal = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
        mask = (seg_q[:, :, None] == seg_k[:, None, :]) & causal[None] & (seg_k[:, None, :] != 0)
        outs.append(_masked_softmax_attend(q[:, :, :, start:stop], k[:, :, :stop], v[:, :, :stop], mask))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHE.dtype)


def attention_with_prefix(q_BTHE, k_BSKE, v_BSKE, mask_BTS, pk_bPKE, pv_bPKE, pvalid_bP, n_kv_heads: int):
    """``attention`` over a shared prefix, then the row's own slots, with one fp32 softmax
    over both: rows r of B attend to prefix row ``r // n`` (n = B // b) where ``pvalid``, then
    to their own slots where ``mask_BTS``. The n rows of a prefix meet its keys in one matmul."""
    B, T, H, E = q_BTHE.shape
    b, P = pvalid_bP.shape
    n, K = B // b, n_kv_heads
    G = H // K
    S = k_BSKE.shape[1]
    q6 = q_BTHE.reshape(b, n, T, K, G, E)
    lp = jnp.einsum("bnTKGE,bPKE->bKnGTP", q6, pk_bPKE).astype(jnp.float32)
    ls = jnp.einsum("BTKGE,BSKE->BKGTS", q_BTHE.reshape(B, T, K, G, E), k_BSKE).astype(jnp.float32)
    ls = ls.reshape(b, n, K, G, T, S).transpose(0, 2, 1, 3, 4, 5)  # [b, K, n, G, T, S]
    big_neg = jnp.finfo(jnp.float32).min
    lp = jnp.where(pvalid_bP[:, None, None, None, None, :], lp, big_neg)
    m6 = mask_BTS.reshape(b, n, T, S)[:, None, :, None]  # [b, 1, n, 1, T, S]
    ls = jnp.where(m6, ls, big_neg)
    logits = jnp.concatenate([lp, ls], axis=-1) / math.sqrt(E)
    probs = jax.nn.softmax(logits, axis=-1)
    any_key = pvalid_bP.any(-1)[:, None, None, None, None, None] | m6.any(-1, keepdims=True)
    probs = jnp.where(any_key, probs, 0.0)
    pp, ps = probs[..., :P], probs[..., P:]
    out = jnp.einsum("bKnGTP,bPKE->bnTKGE", pp.astype(pv_bPKE.dtype), pv_bPKE)
    ps_BKGTS = ps.transpose(0, 2, 1, 3, 4, 5).reshape(B, K, G, T, S)
    out = out.reshape(B, T, K, G, E) + jnp.einsum("BKGTS,BSKE->BTKGE", ps_BKGTS.astype(v_BSKE.dtype), v_BSKE)
    return out.reshape(B, T, H, E)


def create(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A randomly initialised model (tests, benchmarks)."""
    return Llama(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: LlamaConfig) -> Llama:
    """The model's structure and shapes, no memory (for loading and placement)."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(params=0)))


# ---------------------------------------------------------------------------------------------
# The functional view: params as a plain {name: array} dict, the module rebuilt inside jit.


def split_params(model: Llama) -> tuple[nnx.GraphDef, dict[str, jax.Array]]:
    """(graphdef, params): the model as a pure function's static part and its params."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge_params(graphdef: nnx.GraphDef, params: dict) -> Llama:
    """The module back from (graphdef, params)."""
    return nnx.merge(graphdef, nnx.State({name: nnx.Param(value) for name, value in params.items()}))


def apply(graphdef: nnx.GraphDef, params: dict, *args, **kwargs):
    """Run the model given as (graphdef, params); call inside jit/grad/vmap."""
    return merge_params(graphdef, params)(*args, **kwargs)


def apply_nll(graphdef: nnx.GraphDef, params: dict, tokens_BT, positions_BT, segment_ids_BT, loss_mask_BT):
    """The per-target NLL [B, T-1] and its mask under the model (``Llama.head_nll``: the head in
    vocabulary blocks); for passes that take no gradient."""
    m = merge_params(graphdef, params)
    h_BTD = m(tokens_BT, positions_BT, segment_ids_BT, return_hidden=True)
    return m.head_nll(h_BTD, tokens_BT, loss_mask_BT)


def logical_axes(cfg: LlamaConfig) -> dict[str, tuple]:
    """{param name: logical axis names}, from the abstract model (no memory)."""

    state = nnx.state(abstract(cfg), nnx.Param)
    return {name: logical_axes_of(var) for name, var in state.items()}
