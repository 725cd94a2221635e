"""Weights in and out: HF safetensors (single file or sharded with an index), GGUF, and the
HF layout on export, so vLLM and lm-eval-harness can load what we train.

No pickle is ever loaded: safetensors are read here from their JSON header and memory-mapped
(bf16 through ml_dtypes), GGUF through the ``gguf`` package's memory-mapped reader.

Loading builds the model abstractly, then fills each parameter shard by shard: for every
parameter, each distinct device slice is assembled on the host one layer at a time, so a
large model never passes through one host's memory whole (only one parameter's local shards).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from montessori_jax.core import model as model_lib
from montessori_jax.core import sharding as sharding_lib
from montessori_jax.core.compat import open_gguf
from montessori_jax.core.model import LlamaConfig, RopeScaling
from montessori_jax.core.text import embedded_smollm2_path
from montessori_jax.errors import UserError
from montessori_jax.files import is_writer

EMBEDDED = "smollm2"

# ---------------------------------------------------------------------------------------------
# safetensors, read and written directly (header JSON + raw little-endian bytes)

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """A memory-mapped safetensors file; ``get(name)`` returns a read-only numpy view."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length beyond the end of the file")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header = header
        self._base = 8 + n
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
        if self._base + end > size:
            raise UserError(
                f"{path}: truncated safetensors file ({size} bytes, its header needs {self._base + end})"
            )
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        t = self.header[name]
        if t["dtype"] not in _ST_DTYPES:
            raise UserError(f"{self.path}: tensor {name} has unsupported dtype {t['dtype']}")
        dtype = _ST_DTYPES[t["dtype"]]
        a, b = (self._base + int(x) for x in t["data_offsets"])
        return self._mm[a:b].view(dtype).reshape(t["shape"])


def write_safetensors(path: str, tensors: Mapping[str, tuple[np.dtype, tuple, Callable[[], np.ndarray]]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors one at a time: ``tensors[name] = (dtype, shape, produce)``."""
    header, offset = {}, 0
    for name, (dtype, shape, _) in tensors.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (dtype, shape, produce) in tensors.items():
            arr = np.ascontiguousarray(np.asarray(produce(), dtype=dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {arr.shape}, declared {shape}")
            f.write(arr.tobytes())


# ---------------------------------------------------------------------------------------------
# HF config.json <-> LlamaConfig


def config_from_hf(hf: dict, where: str = "config.json", param_dtype="float32", dtype="float32") -> LlamaConfig:
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise UserError(
            f"{where}: not a Llama checkpoint (model_type={hf.get('model_type')!r}, architectures={archs})"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{where}: attention or MLP biases are not supported")
    try:
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        src = {**scaling, **rope}
        if rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(src["factor"]),
                low_freq_factor=float(src["low_freq_factor"]),
                high_freq_factor=float(src["high_freq_factor"]),
                original_max_position_embeddings=int(src["original_max_position_embeddings"]),
            )
        elif rope_type == "default":
            rope_scaling = None
        else:
            raise UserError(f"{where}: rope type {rope_type!r} is not supported (default, llama3)")
        n_heads = int(hf["num_attention_heads"])
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            ffn_dim=int(hf["intermediate_size"]),
            head_dim=hf.get("head_dim"),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            param_dtype=param_dtype,
            dtype=dtype,
        )
    except KeyError as e:
        raise UserError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def config_to_hf(cfg: LlamaConfig, torch_dtype: str, bos_id=None, eos_id=None) -> dict:
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return hf


# ---------------------------------------------------------------------------------------------
# Name maps. Ours -> (HF name pattern, transform from the HF (out, in) tensor to our layout).


def _hf_to_ours(cfg: LlamaConfig) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    d, e, h, k = cfg.d_model, cfg.hd, cfg.n_heads, cfg.n_kv_heads
    L = "model.layers.{i}."
    return {
        "embed": ("model.embed_tokens.weight", lambda w: w),
        "final_norm": ("model.norm.weight", lambda w: w),
        "lm_head": ("lm_head.weight", lambda w: w.T),
        "attn_norm": (L + "input_layernorm.weight", lambda w: w),
        "mlp_norm": (L + "post_attention_layernorm.weight", lambda w: w),
        "wq": (L + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, e)),
        "wk": (L + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, e)),
        "wv": (L + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, e)),
        "wo": (L + "self_attn.o_proj.weight", lambda w: w.T.reshape(h, e, d)),
        "w_gate": (L + "mlp.gate_proj.weight", lambda w: w.T),
        "w_up": (L + "mlp.up_proj.weight", lambda w: w.T),
        "w_down": (L + "mlp.down_proj.weight", lambda w: w.T),
    }


def _ours_to_hf(cfg: LlamaConfig) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Inverse transforms: our layout -> the HF (out, in) tensor."""
    d, e, h, k = cfg.d_model, cfg.hd, cfg.n_heads, cfg.n_kv_heads
    return {
        "embed": lambda w: w,
        "final_norm": lambda w: w,
        "lm_head": lambda w: w.T,
        "attn_norm": lambda w: w,
        "mlp_norm": lambda w: w,
        "wq": lambda w: w.reshape(d, h * e).T,
        "wk": lambda w: w.reshape(d, k * e).T,
        "wv": lambda w: w.reshape(d, k * e).T,
        "wo": lambda w: w.reshape(h * e, d).T,
        "w_gate": lambda w: w.T,
        "w_up": lambda w: w.T,
        "w_down": lambda w: w.T,
    }


_GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
}


# ---------------------------------------------------------------------------------------------
# Sources: where a parameter's per-layer tensors come from, in our layout.


@dataclass
class _Source:
    """``read(name, layer)`` -> one tensor in our layout (layer None for unstacked params)."""

    cfg: LlamaConfig
    read: Callable[[str, int | None], np.ndarray]
    where: str


def _hf_source(folder: str, param_dtype: str, dtype: str) -> _Source:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{folder}: no config.json (expected an HF Llama checkpoint folder)")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, cfg_path, param_dtype, dtype)

    files: dict[str, str] = {}
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index_path}: not a safetensors index ({e})") from None
        files = {name: os.path.join(folder, fn) for name, fn in weight_map.items()}
    elif os.path.isfile(single):
        files = None  # filled below
    else:
        found = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {found[0]}: pickle checkpoints are never loaded; convert to safetensors)" if found else ""
        raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")

    opened: dict[str, SafetensorsFile] = {}

    def open_file(path):
        if path not in opened:
            if not os.path.isfile(path):
                raise UserError(f"{path}: missing (named in {index_path})")
            opened[path] = SafetensorsFile(path)
        return opened[path]

    if files is None:
        st = open_file(single)
        files = {name: single for name in st.keys()}
    if cfg.tie_embeddings is False and "lm_head.weight" not in files:
        cfg = cfg.replace(tie_embeddings=True)  # some exports omit the tied head but not the flag

    hf_map = _hf_to_ours(cfg)

    def read(name: str, layer: int | None) -> np.ndarray:
        pattern, transform = hf_map[name]
        hf_name = pattern.format(i=layer)
        if hf_name not in files:
            raise UserError(f"{folder}: tensor {hf_name} is missing")
        return transform(open_file(files[hf_name]).get(hf_name))

    return _Source(cfg, read, folder)


def _undo_gguf_rope_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Q and K rows interleaved for its rope; restore the HF row order."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_source(path: str, param_dtype: str, dtype: str) -> _Source:
    try:
        import gguf
    except ImportError:  # not on every machine (e.g. a bare GPU node)
        raise UserError("reading GGUF needs the `gguf` package: pip install gguf") from None

    try:
        reader = open_gguf(path)
    except Exception as e:  # the reader raises many kinds on a damaged file
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not llama")
    tensors = {t.name: t for t in reader.tensors}
    size = os.path.getsize(path)
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise UserError(f"{path}: truncated GGUF file (tensor {t.name} runs past the end)")
    try:
        n_heads = int(field("llama.attention.head_count"))
        d_model = int(field("llama.embedding_length"))
        vocab = field("llama.vocab_size") or int(tensors["token_embd.weight"].shape[-1])
        cfg = LlamaConfig(
            vocab_size=int(vocab),
            d_model=d_model,
            n_layers=int(field("llama.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(field("llama.attention.head_count_kv", n_heads)),
            ffn_dim=int(field("llama.feed_forward_length")),
            head_dim=int(field("llama.attention.key_length", d_model // n_heads)),
            rope_theta=float(field("llama.rope.freq_base", 10000.0)),
            rms_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensors,
            max_position_embeddings=int(field("llama.context_length", 2048)),
            param_dtype=param_dtype,
            dtype=dtype,
        )
    except (TypeError, KeyError) as e:
        raise UserError(f"{path}: missing Llama metadata ({e})") from None
    if "rope_freqs.weight" in tensors:
        factors = gguf.quants.dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
        cfg = cfg.replace(rope_scaling=_llama3_scaling_from_factors(cfg, np.asarray(factors), path))

    def read(name: str, layer: int | None) -> np.ndarray:
        gname = _GGUF_NAMES[name].format(i=layer)
        if gname not in tensors:
            raise UserError(f"{path}: tensor {gname} is missing")
        t = tensors[gname]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name == "wq":
            w = _undo_gguf_rope_order(w, cfg.n_heads)
        elif name == "wk":
            w = _undo_gguf_rope_order(w, cfg.n_kv_heads)
        pattern, transform = _hf_to_ours(cfg)[name]
        return transform(w)

    return _Source(cfg, read, path)


def _llama3_scaling_from_factors(cfg: LlamaConfig, factors: np.ndarray, path: str) -> RopeScaling:
    """GGUF stores Llama 3.1 rope scaling as per-frequency divisors; find the llama3
    parameters (the ones Meta's models use) that give them."""
    base = np.asarray(model_lib.rope_inv_freq(cfg.replace(rope_scaling=None)))
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        for orig in (8192, 4096, 2048, 16384):
            s = RopeScaling(factor, 1.0, 4.0, orig)
            scaled = np.asarray(model_lib.rope_inv_freq(cfg.replace(rope_scaling=s)))
            if np.allclose(base / scaled, factors, rtol=1e-3):
                return s
    raise UserError(f"{path}: rope_freqs do not match any llama3 rope scaling we know")


def resolve_path(path: str) -> str:
    """The checkpoint a model path names (``"smollm2"``: the embedded GGUF); it must exist."""
    if path == EMBEDDED:
        return embedded_smollm2_path()
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    return path


def _source(path: str, param_dtype: str, dtype: str) -> _Source:
    path = resolve_path(path)
    if os.path.isdir(path):
        return _hf_source(path, param_dtype, dtype)
    if path.endswith(".gguf"):
        return _gguf_source(path, param_dtype, dtype)
    raise UserError(f"{path}: expected an HF checkpoint folder or a .gguf file")


def read_config(path: str, param_dtype: str = "float32", dtype: str = "float32") -> LlamaConfig:
    """The architecture of the checkpoint at ``path`` (config.json or GGUF metadata; no weights read)."""
    return _source(path, param_dtype, dtype).cfg


# ---------------------------------------------------------------------------------------------
# Loading into a (possibly sharded) model


def _fill(src: _Source, name: str, shape: tuple, stacked: bool, np_dtype, sharding) -> jax.Array:
    """Assemble one parameter: each distinct device slice once, reading one layer at a time."""
    if sharding is None:
        idx_map = {None: (slice(None),) * len(shape)}
    else:
        idx_map = sharding.addressable_devices_indices_map(shape)
    distinct: dict[tuple, np.ndarray] = {}
    keys = {}
    for dev, idx in idx_map.items():
        key = tuple((s.start, s.stop) for s in idx)
        keys[dev] = key
        if key not in distinct:
            distinct[key] = np.empty(_slice_shape(idx, shape), np_dtype)

    def check(w, expected):
        if w.shape != expected:
            raise UserError(f"{src.where}: tensor for {name} has shape {w.shape}, expected {expected}")
        return w

    if stacked:
        for layer in range(shape[0]):
            w = None
            for key, buf in distinct.items():
                lo, hi = key[0]
                lo, hi = lo or 0, shape[0] if hi is None else hi
                if lo <= layer < hi:
                    if w is None:
                        w = check(src.read(name, layer), shape[1:])
                    buf[layer - lo] = w[tuple(slice(a, b) for a, b in key[1:])]
    else:
        w = check(src.read(name, None), shape)
        for key, buf in distinct.items():
            buf[...] = w[tuple(slice(a, b) for a, b in key)]

    if sharding is None:
        return jax.numpy.asarray(next(iter(distinct.values())))
    arrays = [jax.device_put(distinct[keys[dev]], dev) for dev in idx_map]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _slice_shape(idx, shape):
    return tuple(len(range(*s.indices(n))) for s, n in zip(idx, shape))


def load_model(
    path: str,
    param_dtype: str = "float32",
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping | None = None,
    remat: bool = False,
) -> model_lib.Llama:
    """Load a Llama from an HF folder, a .gguf file or ``"smollm2"`` (the embedded model).

    With a mesh, each parameter is placed by its logical axis names as it is read.
    """

    src = _source(path, param_dtype, dtype)
    cfg = src.cfg.replace(remat=remat)
    abstract = model_lib.abstract(cfg)
    graphdef, state = nnx.split(abstract)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if param_dtype == "bfloat16" else np.dtype(param_dtype)
    shardings = None
    if mesh is not None:
        shardings = sharding_lib.state_shardings(state, mesh, rules or sharding_lib.DEFAULT_RULES)

    def one(path_, var):
        name = path_[0].key
        sh = None if shardings is None else shardings[name].get_value()
        value = _fill(src, name, tuple(var.shape), name in model_lib.Llama.LAYER_PARAMS, np_dtype, sh)
        return var.replace(value)

    state = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# Export to the HF layout


def _hf_tensor_list(cfg: LlamaConfig) -> Iterator[tuple[str, str, int | None]]:
    """(HF name, our name, layer) in the order HF writes them."""
    yield "model.embed_tokens.weight", "embed", None
    for i in range(cfg.n_layers):
        for ours in model_lib.Llama.LAYER_PARAMS:
            yield _hf_to_ours(cfg)[ours][0].format(i=i), ours, i
    yield "model.norm.weight", "final_norm", None
    if not cfg.tie_embeddings:
        yield "lm_head.weight", "lm_head", None


def hf_arrays(cfg: LlamaConfig, tree: Mapping[str, jax.Array]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in the HF (out, in) layout) for each tensor of ``tree``, a dict in
    our params' layout (the params, or AdamW moments of the same shapes), in the export's order.
    Each tensor is gathered to the host as it is yielded."""
    inverse = _ours_to_hf(cfg)
    for hf_name, ours, layer in _hf_tensor_list(cfg):
        value = tree[ours] if layer is None else tree[ours][layer]
        yield hf_name, inverse[ours](np.asarray(sharding_lib.to_host(value), dtype=np.float32))


def save_hf(
    model: model_lib.Llama,
    out_dir: str,
    tokenizer=None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> str:
    """Write config.json, generation_config.json, safetensors (sharded with an index past
    ``max_shard_bytes``) and the tokenizer files. Written to a temporary folder beside
    ``out_dir`` and renamed into place when complete.

    One tensor at a time (a layer's slice of a stacked param), each gathered from its shards
    as it is written: the whole model never sits on one host. In a cluster every process
    takes part in each gather and only the writer (process 0) writes."""
    cfg = model.cfg
    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    state = nnx.state(model, nnx.Param)
    inverse = _ours_to_hf(cfg)

    def produce(ours: str, layer: int | None):
        def get():
            value = state[ours].get_value()
            host = np.asarray(sharding_lib.to_host(value if layer is None else value[layer]), dtype=np.float32)
            return inverse[ours](host).astype(np_dtype)

        return get

    specs = []
    for hf_name, ours, layer in _hf_tensor_list(cfg):
        shape = tuple(state[ours].shape[1:] if layer is not None else state[ours].shape)
        hf_shape = inverse[ours](np.empty(shape, np.int8)).shape
        specs.append((hf_name, hf_shape, produce(ours, layer)))

    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes

    if not is_writer():
        for _, _, get in specs:  # the writer's gathers need every process
            get()
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        bos = getattr(tokenizer, "bos_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg, dtype, bos, eos), f, indent=2)
        gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": getattr(tokenizer, "pad_token_id", None)}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
        weight_map = {}
        for n, shard in enumerate(shards):
            fn = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(tmp, fn), {name: (np_dtype, shape, get) for name, shape, get in shard})
            weight_map.update({name: fn for name, _, _ in shard})
        if len(shards) > 1:
            total = sum(math.prod(s[1]) * np_dtype.itemsize for s in specs)
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

