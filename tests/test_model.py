"""The decoder equals transformers' LlamaForCausalLM (fp32, CPU) on random tiny configs."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import tiny_torch_llama

from montessori_jax.core import batching
from montessori_jax.core import model as M
from montessori_jax.core import weights

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "untied_gqa": dict(),
    "tied_mha": dict(tie_word_embeddings=True, num_key_value_heads=8),
    "gqa_llama3_rope": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "tied_mqa_llama3_rope": dict(tie_word_embeddings=True, num_key_value_heads=1, rope_scaling=LLAMA3_ROPE),
}


def _ours(torch_model, tmp_path):
    torch_model.save_pretrained(tmp_path)
    return weights.load_model(str(tmp_path))


def _padded_batch(lengths, T, side, vocab, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, vocab, (len(lengths), T))
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n:] = 1
    ids = np.where(mask == 1, ids, 0)
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None) * mask
    return ids, mask, positions


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(case, side, tmp_path):
    tm = tiny_torch_llama(seed=1, **CASES[case])
    ours = _ours(tm, tmp_path)
    assert ours.cfg.tie_embeddings == tm.config.tie_word_embeddings
    # a length past original_max_position_embeddings exercises all three rope bands
    ids, mask, pos = _padded_batch([48, 31, 7], 48, side, tm.config.vocab_size)
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    out = np.asarray(ours(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(out[real] - ref[real]).max() <= 1e-4


def test_positions_from_segments():
    seg = np.array([[0, 0, 1, 1, 1], [1, 1, 2, 2, 0]])
    pos = batching.segment_positions(seg)
    np.testing.assert_array_equal(np.asarray(pos), [[0, 0, 0, 1, 2], [0, 1, 0, 1, 0]])


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=500000.0,
                     rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 8192})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = weights.config_from_hf(hf.to_dict())
    np.testing.assert_allclose(np.asarray(M.rope_inv_freq(cfg)), ref.numpy(), rtol=1e-6)
    # the scaling changes the low frequencies and keeps the high ones
    plain = M.rope_inv_freq(cfg.replace(rope_scaling=None))
    assert float(plain[0]) == pytest.approx(float(M.rope_inv_freq(cfg)[0]))
    assert float(plain[-1]) == pytest.approx(8.0 * float(M.rope_inv_freq(cfg)[-1]), rel=1e-5)


def test_kv_cache_decode_equals_full_forward():
    cfg = M.LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    m = M.create(cfg, seed=3)
    ids = jnp.array(np.random.RandomState(0).randint(0, 50, (2, 12)))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full = m(ids, pos)
    cache = M.init_cache(cfg, 2, 16)
    logits, cache = m(ids[:, :8], pos[:, :8], cache=cache, cache_index=0)
    steps = [logits]
    for t in range(8, 12):
        logits, cache = m(ids[:, t:t + 1], pos[:, t:t + 1], cache=cache, cache_index=t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), atol=1e-5)


def test_shared_prefix_cache_equals_repeated_prompt_cache():
    """n rows reading one prompt's cache as a prefix decode as n rows each holding a copy."""
    cfg = M.LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    m = M.create(cfg, seed=5)
    rs = np.random.RandomState(1)
    b, n, P, steps = 2, 3, 8, 4
    prompt = rs.randint(1, 50, (b, P))
    segs = np.ones((b, P), np.int32)
    segs[1, :3] = 0  # the second prompt is left-padded by 3
    pos = np.maximum(np.cumsum(segs, 1) - 1, 0)
    nxt = rs.randint(1, 50, (b * n, steps))  # each row continues with its own tokens
    # reference: every row holds its prompt's cache (the old layout)
    cache = M.init_cache(cfg, b * n, P + steps)
    rep = lambda a: jnp.asarray(np.repeat(a, n, axis=0))
    _, cache = m(rep(prompt), rep(pos), rep(segs), cache=cache, cache_index=0)
    # shared: the prompts' cache is the prefix, each row has `steps` slots of its own
    pre = M.init_cache(cfg, b, P)
    _, pre = m(jnp.asarray(prompt), jnp.asarray(pos), jnp.asarray(segs), cache=pre, cache_index=0)
    shared = {**M.init_cache(cfg, b * n, steps), "prefix": pre}
    last = np.repeat(pos[:, -1], n) + 1
    for t in range(steps):
        tok = jnp.asarray(nxt[:, t:t + 1])
        p_t = jnp.asarray(last + t)[:, None]
        ones = jnp.ones_like(tok)
        want, cache = m(tok, p_t, ones, cache=cache, cache_index=P + t)
        got, shared = m(tok, p_t, ones, cache=shared, cache_index=t)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert shared["prefix"]["k"].shape == (cfg.n_layers, b, P, cfg.n_kv_heads, cfg.hd)


def test_bf16_compute_is_close_to_fp32():
    cfg = M.LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    m32 = M.create(cfg, seed=0)
    m16 = M.create(cfg.replace(dtype="bfloat16"), seed=0)
    ids = jnp.array([[1, 2, 3, 4, 5]])
    pos = jnp.arange(5)[None]
    a, b = m32(ids, pos), m16(ids, pos)
    assert b.dtype == jnp.float32  # logits always fp32
    assert 0 < float(jnp.abs(a - b).max()) < 0.1


def test_logical_axes_on_every_param():
    from flax import nnx

    from montessori_jax.core.compat import logical_axes_of

    cfg = M.LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    state = nnx.state(M.abstract(cfg), nnx.Param)
    leaves = [v for v in jax_leaves(state)]
    assert len(leaves) == 12
    for v in leaves:
        axes = logical_axes_of(v)
        assert axes is not None and len(axes) == len(v.shape)


def jax_leaves(state):
    import jax
    from flax import nnx

    return jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_nll_in_vocab_blocks_equals_the_full_logits(tied, dtype):
    # 500 entries in blocks of 96 (the last one partial): the targets fall in every block
    from montessori_jax.core.losses import token_nll_per_position

    cfg = M.LlamaConfig(vocab_size=500, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48,
                        tie_embeddings=tied, dtype=dtype)
    m = M.create(cfg, seed=3)
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 40, 32)) * 3, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 500, (2, 40)))
    mask = jnp.asarray(rng.random((2, 40)) < 0.8)
    got, got_mask = m.head_nll(h, tokens, mask, block=96)
    want, want_mask = token_nll_per_position(m.head(h), tokens, mask)
    np.testing.assert_array_equal(np.asarray(got_mask), np.asarray(want_mask))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)
    if dtype == "float32":  # against the NLL written out in float64 from the head's weight
        w = np.asarray(m.embed[...], np.float64).T if tied else np.asarray(m.lm_head[...], np.float64)
        logits = np.asarray(h, np.float64) @ w
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        tok = np.asarray(tokens)
        target = np.take_along_axis(logits[:, :-1], tok[:, 1:, None], -1)[..., 0]
        hand = (lse[:, :-1] - target) * np.asarray(mask)[:, 1:]
        np.testing.assert_allclose(np.asarray(got), hand, rtol=1e-5, atol=1e-5)
