"""The ``synthesis`` config section (frozen dataclasses; see ``montessori_jax.config``)."""

from __future__ import annotations

import dataclasses

from montessori_jax.config import ModelConfig
from montessori_jax.synthesis.filters import BLACKLIST
from montessori_jax.synthesis.seeds import FIELDS


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How the teacher samples in one phase (instructions or responses)."""

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    presence_penalty: float = 1.0  # vLLM's: subtracted once from every token already generated
    max_new_tokens: int = 1024

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """Step 1 of the method: the teacher writes instructions from 8-shot prompts, the filters
    keep new and usable ones, and the teacher answers them.

    The run stops when ``num_instructions`` are kept or ``max_prompts`` prompts are spent.
    """

    seed_pool: str = "default"  # "default" (shipped), a .jsonl file, a datasets folder or hub id
    seed_split: str = "train"  # split of an HF dataset
    seed_fields: dict[str, str] | None = None  # our field -> the pool's column, e.g. {instruction: prompt}
    num_instructions: int | None = 64  # stop once this many are kept; null: only max_prompts stops
    max_prompts: int | None = None  # prompt budget; null: 10x what num_instructions needs at best
    samples_per_prompt: int = 4
    prompts_per_round: int = 16  # prompts generated (and committed to disk) together
    batch_size: int = 64  # sequences (prompts x samples) the sampler decodes at once
    shots: int = 8  # example instructions per prompt
    generated_shots: int = 2  # of which earlier kept instructions, once that many exist
    preamble: str | None = None  # null: prompts.DEFAULT_PREAMBLE
    # text the teacher's answer is made to start with (e.g. "<instruction>", which helps small
    # teachers keep the format); part of raw_output. "": none, as in the original method
    instruction_prefix: str = ""
    instruction_sampling: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(temperature=1.0, top_p=0.9, presence_penalty=1.0, max_new_tokens=1024)
    )
    response_sampling: GenerationConfig = dataclasses.field(
        default_factory=lambda: GenerationConfig(temperature=0.6, top_p=0.9, presence_penalty=1.0, max_new_tokens=1024)
    )
    min_chars: int = 5  # kept instructions have min_chars..max_chars characters
    max_chars: int = 400
    blacklist: tuple[str, ...] = BLACKLIST  # whole words/phrases, any case
    rouge_threshold: float = 0.7  # drop when ROUGE-L F1 > this against a seed or a kept instruction
    splits: dict[str, int | float] | None = None  # e.g. {warmup: 100, probe: 400}, or fractions
    iteration: int = 0  # recorded in every row; part of the prompts' random stream

    def __post_init__(self):
        if self.num_instructions is None and self.max_prompts is None:
            raise ValueError("set num_instructions or max_prompts (or both)")
        for name in ("num_instructions", "max_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        for name in ("samples_per_prompt", "prompts_per_round", "batch_size", "shots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.generated_shots <= self.shots:
            raise ValueError(f"generated_shots={self.generated_shots} must be in [0, shots={self.shots}]")
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(f"need 0 <= min_chars ({self.min_chars}) <= max_chars ({self.max_chars})")
        if not 0 < self.rouge_threshold <= 1:
            raise ValueError(f"rouge_threshold={self.rouge_threshold} must be in (0, 1]")
        for key in self.seed_fields or {}:
            if key not in FIELDS:
                raise ValueError(f"seed_fields: unknown field '{key}'; mappable: {', '.join(FIELDS)}")
        if self.splits:
            values = list(self.splits.values())
            if len({type(v) for v in values}) > 1:
                raise ValueError("splits: give all counts (integers) or all fractions (floats)")
            if any(v <= 0 for v in values):
                raise ValueError("splits: every count or fraction must be > 0")
            if isinstance(values[0], float) and sum(values) > 1 + 1e-9:
                raise ValueError(f"splits: fractions sum to {sum(values):g} > 1")
            if isinstance(values[0], int) and self.num_instructions is not None and sum(values) > self.num_instructions:
                raise ValueError(f"splits need {sum(values)} records but num_instructions={self.num_instructions}")

    @property
    def prompt_budget(self) -> int:
        """``max_prompts``, or 10x the prompts ``num_instructions`` needs if every sample is kept."""
        if self.max_prompts is not None:
            return self.max_prompts
        return 10 * -(-self.num_instructions // self.samples_per_prompt)


@dataclasses.dataclass(frozen=True)
class SynthesizeCommandConfig:
    """What ``montessori synthesize`` reads while the top-level ``Config`` has no synthesis
    section: the run's seed, the teacher and the section itself."""

    seed: int = 0
    teacher: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    synthesis: SynthesisConfig = dataclasses.field(default_factory=SynthesisConfig)
