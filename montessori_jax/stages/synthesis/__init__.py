"""Synthesis (step 1 of the method): seed pools, 8-shot instruction prompts, parsing and
filters, fast ROUGE-L dedup, the teacher's responses, crash-safe records and splits.

    from montessori_jax.stages.synthesis import SynthesisConfig, synthesize
    summary = synthesize(SynthesisConfig(num_instructions=200, splits={"warmup": 100, "probe": 100}),
                         "runs/it0/synth", teacher="smollm2", seed=0)
"""

from montessori_jax.config import GenerationConfig, SynthesisConfig
from montessori_jax.stages.synthesis.filters import DROP_REASONS, InstructionFilter, Verdict, extract_instruction
from montessori_jax.stages.synthesis.prompts import DEFAULT_PREAMBLE, build_prompt
from montessori_jax.stages.synthesis.rouge import RougeLIndex, rouge_l
from montessori_jax.stages.synthesis.seeds import SeedTask, load_seed_pool
from montessori_jax.stages.synthesis.stage import (
    Completion,
    Generator,
    TeacherGenerator,
    format_summary,
    run_synthesize,
    synthesize,
)

__all__ = [
    "DEFAULT_PREAMBLE",
    "DROP_REASONS",
    "Completion",
    "GenerationConfig",
    "Generator",
    "InstructionFilter",
    "RougeLIndex",
    "SeedTask",
    "SynthesisConfig",
    "TeacherGenerator",
    "Verdict",
    "build_prompt",
    "extract_instruction",
    "format_summary",
    "load_seed_pool",
    "rouge_l",
    "run_synthesize",
    "synthesize",
]
