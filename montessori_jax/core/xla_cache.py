"""JAX's persistent compilation cache for every command that compiles: programs that stages
compile again (the SFT step of the warm-up and of the training, the sampler of each synthesis
and eval) and programs of an earlier run come from disk. ``JAX_COMPILATION_CACHE_DIR`` chooses
the folder; a folder already set in JAX's config is kept."""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "montessori_jax", "xla")


def use_compilation_cache() -> None:
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_DIR)
