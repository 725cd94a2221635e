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
