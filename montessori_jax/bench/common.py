"""What every benchmark shares: the machine's description and the random model shapes."""

from __future__ import annotations

import os
import platform

from montessori_jax.core import model as model_lib

# random-weight models of the real shapes (core.model.SHAPES), without SmolLM2's
RANDOM_PRESETS = {name: model_lib.SHAPES[name] for name in ("tinyllama", "llama3-8b", "tiny")}


def machine_info() -> dict:
    """What ran the benchmark: platform, CPU, memory, library versions, JAX devices."""
    import jax

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for name in ("flax", "torch", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def build_model(model: str, random: str | None, param_dtype: str = "float32", dtype: str = "float32",
                remat: bool = False):
    """(our model, its display name): a random-init ``RANDOM_PRESETS`` shape (no download, no
    tokenizer) or a loaded one."""
    from montessori_jax.core import model as model_lib
    from montessori_jax.core import weights
    from montessori_jax.errors import UserError

    if random is None:
        return weights.load_model(model, param_dtype, dtype, remat=remat), model
    if random not in RANDOM_PRESETS:
        raise UserError(f"random model {random!r}: expected one of {sorted(RANDOM_PRESETS)}")
    cfg = model_lib.LlamaConfig(**RANDOM_PRESETS[random], param_dtype=param_dtype, dtype=dtype, remat=remat)
    return model_lib.create(cfg, seed=0), f"random {random}"


def cost_fields(flops_per_s: float | None) -> dict:
    """Achieved FLOP/s, MFU against the device's bf16 peak (None where unknown) and peak memory."""
    from montessori_jax.core import profiling

    mem, what = profiling.peak_memory_bytes()
    out = {"peak_memory_gb": round(mem / 2**30, 3), "peak_memory_measured": what}
    if flops_per_s is not None:
        out.update(achieved_flops_per_s=flops_per_s, mfu=profiling.mfu(flops_per_s),
                   peak_bf16_flops=profiling.peak_flops())
    return out


_PIECES = None


def standin_example(prompt: str, response: str, vocab_size: int, max_len: int):
    """A text pair as token ids for a random-init model, which has no tokenizer: one token per
    word or punctuation mark (English BPE gives about as many), ids from a stable hash into
    the vocabulary, 2 framing tokens around the prompt; the response and a closing token are
    the targets. Only the lengths matter to a timing."""
    import re
    import zlib

    import numpy as np

    from montessori_jax.core import text

    global _PIECES
    _PIECES = _PIECES or re.compile(r"\w+|[^\w\s]")

    def ids(s):
        return [3 + zlib.crc32(w.encode()) % (vocab_size - 3) for w in _PIECES.findall(s)]

    p, r = [1, *ids(prompt), 2], [*ids(response), 2]
    tokens = np.asarray(p + r, np.int32)[:max_len]
    mask = (np.arange(len(p) + len(r)) >= len(p))[:max_len]
    return text.Example(tokens, mask, truncated=len(p) + len(r) > max_len)
