"""The ``synthesis`` config section lives in ``montessori_jax.config`` with the rest of the
schema; these names are re-exported for ``from montessori_jax.synthesis import ...``."""

from montessori_jax.config import GenerationConfig, SynthesisConfig

__all__ = ["GenerationConfig", "SynthesisConfig"]
