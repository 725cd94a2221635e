"""Version shims for the fast-moving JAX / Flax NNX APIs. The only place that knows versions."""

from __future__ import annotations

import functools

import jax
from flax import nnx


def make_param(value, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    """An ``nnx.Param`` carrying logical axis names as metadata.

    Logical names are kept under our own key rather than NNX's ``out_sharding``: NNX would
    shard eagerly on creation and read the names as mesh axes, while ours go through the rules
    table in ``sharding.py`` first.
    """
    if len(logical_axes) != value.ndim:
        raise ValueError(f"logical axes {logical_axes} do not match shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(logical_axes))


def logical_axes_of(variable) -> tuple | None:
    """The logical axis names of a Variable (or None)."""
    try:
        return variable.get_metadata("logical_axes", None)
    except (AttributeError, TypeError):
        meta = getattr(variable, "metadata", None) or {}
        return meta.get("logical_axes")


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...], devices=None) -> jax.sharding.Mesh:
    """A mesh whose axes are all ``Auto`` (the default became Explicit, under which ordinary
    sharded matmuls raise)."""
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    if devices is None:
        return jax.make_mesh(shape, names, axis_types=auto)
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices)


@functools.lru_cache(maxsize=2)
def open_gguf(path: str):
    """A memory-mapped ``gguf.GGUFReader``, shared by the weights and the tokenizer (parsing a
    large vocabulary's metadata takes seconds)."""
    import gguf

    return gguf.GGUFReader(path, "r")


def gguf_tokenizer(path: str):
    """A transformers fast tokenizer built from a GGUF file's metadata, without torch.

    ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` reads the metadata with a reader
    that imports torch (transformers 5.x), and the product does not install torch. We read
    the same metadata with the ``gguf`` package and hand it to transformers' own (torch-free)
    converter, mirroring its ``get_gguf_tokenizer``.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = open_gguf(path)

    def value(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    grouped = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        grouped[group] = {}
        for key, name in renames.items():
            v = value(f"tokenizer.{key}")
            if v is not None:
                grouped[group][name] = v
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # sentencepiece files add bos unless told
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = value(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[int(token_id)] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(value("general.architecture"), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=path, **tokenizer_config, **extra)
