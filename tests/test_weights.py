"""Weights in and out: HF safetensors (single, sharded, bf16), GGUF (the embedded SmolLM2),
export that transformers loads, and clear errors for damaged files."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import tiny_torch_llama

from montessori_jax.core import text, weights
from montessori_jax.errors import UserError


def _logits_torch(tm, ids):
    with torch.no_grad():
        return tm(torch.tensor(ids)).logits.float().numpy()


def _logits_ours(m, ids):
    return np.asarray(m(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)))


IDS = np.random.RandomState(0).randint(2, 300, (2, 20))


@pytest.mark.parametrize("shard_size", [None, "60KB"])
def test_loads_transformers_save_pretrained(shard_size, tmp_path):
    tm = tiny_torch_llama(seed=2)
    kw = {} if shard_size is None else {"max_shard_size": shard_size}
    tm.save_pretrained(tmp_path, **kw)
    sharded = os.path.exists(tmp_path / "model.safetensors.index.json")
    assert sharded == (shard_size is not None)
    ours = weights.load_model(str(tmp_path))
    assert np.abs(_logits_ours(ours, IDS) - _logits_torch(tm, IDS)).max() <= 1e-4


def test_export_loads_in_transformers_with_same_logits(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = tiny_checkpoint
    ours = weights.load_model(folder)
    tok = text.load_tokenizer(folder)
    out = weights.save_hf(ours, str(tmp_path / "export"), tokenizer=tok, max_shard_bytes=40_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "generation_config.json" in files
    assert "tokenizer.json" in files and "config.json" in files
    tm = AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(_logits_torch(tm, IDS) - _logits_ours(ours, IDS)).max() <= 1e-4
    # and the export reads back into ours bit for bit
    again = weights.load_model(out)
    assert np.array_equal(_logits_ours(again, IDS), _logits_ours(ours, IDS))
    assert AutoTokenizer.from_pretrained(out).eos_token == tok.eos_token


def test_bf16_checkpoint_round_trip(tmp_path):
    tm = tiny_torch_llama(seed=4, tie_word_embeddings=True).to(torch.bfloat16)
    tm.save_pretrained(tmp_path / "in")
    ours = weights.load_model(str(tmp_path / "in"), param_dtype="bfloat16")
    assert ours.embed[...].dtype == jnp.bfloat16
    weights.save_hf(ours, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    a = weights.SafetensorsFile(str(tmp_path / "in" / "model.safetensors"))
    b = weights.SafetensorsFile(str(tmp_path / "out" / "model.safetensors"))
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        assert np.array_equal(a.get(k), b.get(k)), k


def test_embedded_smollm2_gguf_matches_transformers(smollm2_jax, smollm2_torch, smollm2_tok):
    cfg = smollm2_jax.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (30, 576, 9, 3, 1536)
    assert cfg.tie_embeddings and cfg.rope_theta == 1e5
    ids = np.asarray([text.encode_prompt(smollm2_tok, "Write a haiku about the sea.")])
    ref = _logits_torch(smollm2_torch, ids)
    out = _logits_ours(smollm2_jax, ids)
    assert np.array_equal(out.argmax(-1), ref.argmax(-1))
    # measured 1.1e-4: float32 accumulation order over 30 layers of dequantized weights
    assert np.abs(out - ref).max() <= 5e-4


def test_undo_gguf_rope_order_inverts_llama_cpp_permute():
    n_heads, head_dim, cols = 3, 8, 5
    w_hf = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # llama.cpp's convert script: reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)
    permuted = w_hf.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w_hf.shape)
    assert np.array_equal(weights._undo_gguf_rope_order(permuted, n_heads), w_hf)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_path():
    with pytest.raises(UserError, match="/no/such/model: no such file or folder"):
        weights.load_model("/no/such/model")


def test_not_a_llama(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config\.json: not a Llama checkpoint"):
        weights.load_model(str(tmp_path / "m"))


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    shutil.copytree(folder, tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(UserError, match=r"model\.safetensors: truncated safetensors file"):
        weights.load_model(str(tmp_path / "m"))


def test_pickle_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickle checkpoints are never loaded"):
        weights.load_model(str(tmp_path))


def test_truncated_gguf(smollm2_path, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        bad.write_bytes(f.read(os.path.getsize(smollm2_path) - 4096))
    with pytest.raises(UserError, match=r"cut\.gguf: .*(truncated|not a readable GGUF)"):
        weights.load_model(str(bad))
    header_only = tmp_path / "head.gguf"
    with open(smollm2_path, "rb") as f:
        header_only.write_bytes(f.read(100))
    with pytest.raises(UserError, match=r"head\.gguf: not a readable GGUF file"):
        weights.load_model(str(header_only))


def test_export_from_sharded_params_equals_unsharded(tiny_checkpoint, tmp_path):
    """On a data 2 x fsdp 2 x tensor 2 mesh the export gathers each tensor from its shards: the
    files are byte for byte the single-device export's, and they equal the params."""
    from safetensors.numpy import load_file

    from montessori_jax.core import sharding

    folder, _ = tiny_checkpoint
    mesh = sharding.mesh_from_config(2, 2, 2)
    sharded = weights.load_model(folder, mesh=mesh, rules=sharding.DEFAULT_RULES)
    wq = sharded.wq.get_value()
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    a = weights.save_hf(sharded, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    b = weights.save_hf(weights.load_model(folder), str(tmp_path / "single"), max_shard_bytes=40_000)
    names = sorted(f for f in os.listdir(b) if f.endswith(".safetensors"))
    assert len(names) > 1 and names == sorted(f for f in os.listdir(a) if f.endswith(".safetensors"))
    for f in names:
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            assert fa.read() == fb.read(), f
    exported = {k: v for f in names for k, v in load_file(os.path.join(a, f)).items()}
    original = {k: v for f in os.listdir(folder) if f.endswith(".safetensors")
                for k, v in load_file(os.path.join(folder, f)).items()}
    assert exported.keys() == original.keys()
    for k in original:
        assert np.array_equal(exported[k], original[k].astype(exported[k].dtype)), k
