"""Configuration: frozen dataclasses are the schema, YAML files are presets, and dotted
``key=value`` overrides come from the command line.

    cfg = load_config(Config, "configs/default.yaml", ["student.remat=true", "seed=3"])

Every mistake a user can make raises a one-line ``ConfigError`` that says where it came from
(``FILE, line N`` or ``override 'k=v'``) and what is wrong: an unknown key together with the
valid keys at its level, or a wrong type together with the dotted key and the expected type.

YAML is read with YAML 1.2 scalars: only ``true``/``false`` are booleans (``yes``, ``no``,
``on``, ``off`` stay strings) and ``1e-6`` is a float. A float field still accepts any string
that ``float()`` parses, so values built by other YAML readers validate too.

A later stage adds its section as a frozen dataclass and a field of ``Config``; the machinery
below (``from_dict``, ``to_dict``, ``diff``) needs no change.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import yaml

from montessori_jax.errors import ConfigError

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# The schema.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A teacher or student model: where its weights live and the dtypes it runs in."""

    path: str = "smollm2"  # an HF folder, a .gguf file, or "smollm2" (embedded SmolLM2-135M-Instruct)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the weights are stored in
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of the matmuls
    remat: bool = False  # recompute each layer's activations in the backward pass
    # a Jinja chat template file (UTF-8) that replaces the tokenizer's own wherever this model's
    # tokenizer is loaded; null: the model's own (or the Llama-3-style default when it has none)
    chat_template: str | None = None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (``data`` x ``fsdp`` x ``tensor``) and the logical-axis rules on it."""

    data: int = 1
    fsdp: int = -1  # -1: all devices that data and tensor leave over
    tensor: int = 1
    rules: dict[str, str | None] | None = None  # logical axis -> mesh axis, over the default table


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its warmup-stable-decay schedule (ratios of the run's total steps)."""

    lr: float = 5e-6  # peak learning rate
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_norms: bool = False  # apply weight decay to the RMSNorm weights too
    warmup_ratio: float = 0.1
    stable_ratio: float = 0.5
    decay_ratio: float = 0.4
    min_lr_ratio: float = 0.0  # the lr decays to lr * min_lr_ratio
    decay_shape: Literal["linear", "cosine"] = "linear"  # cosine: half a cosine, transformers' default
    # how the ratios become lrs per optimizer step i (0-based) of T steps:
    #   montessori: W = round(warmup_ratio*T), D = round(decay_ratio*T); warmup lr*(i+1)/W, so the
    #     first step learns and the last warmup step is at the peak (an all-warmup warm-up ends
    #     there, and the influence step continues at that lr); the decay reaches
    #     lr*min_lr_ratio at the last step
    #   transformers: exactly transformers' get_wsd_schedule as the original code's Trainer runs
    #     it (version 4.44.2, which it pins): W, S, D = int(ratio*T) each; step i gets
    #     lambda(i): warmup lr*i/W (0 at the first step), decay from the peak towards
    #     lr*min_lr_ratio over D steps, lr*min_lr_ratio after W+S+D. The influence step
    #     continues at lambda(T), the lr the original's optimizer holds after the last step.
    #     (Later transformers start the warmup at lr*min_lr_ratio; the same when it is 0.)
    schedule: Literal["montessori", "transformers"] = "montessori"
    grad_clip: float | None = 1.0  # clip the global gradient norm; null: no clipping

    def __post_init__(self):
        total = self.warmup_ratio + self.stable_ratio + self.decay_ratio
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"warmup_ratio + stable_ratio + decay_ratio = {total:g}, must be 1")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning of the student (warm-up and training): loss on responses only."""

    data: str = ""  # JSONL file, a saved HF dataset folder, or a hub id (where a hub is reachable)
    split: str = "train"  # the split of an HF dataset
    prompt_field: str = "instruction"  # also read: `input` appended, or chat `messages`
    response_field: str = "response"  # `output` is accepted when this field is absent
    system: str | None = None  # a system prompt for every example
    eval_data: str | None = None  # held-out examples; or carve them out with eval_fraction
    eval_fraction: float = 0.0
    max_len: int = 1024  # longer examples are truncated (and counted)
    pack: bool = False  # pack several examples per row; attention stays within each
    batch_size: int = 8  # global batch, in examples
    micro_batch_size: int | None = None  # per accumulation step; null: batch_size
    epochs: int = 1
    max_steps: int | None = None  # stop early after this many optimizer steps
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    log_every: int = 10  # steps between metrics brought to the host
    save_every: int = 100  # steps between checkpoints (and one at the end)
    eval_every: int = 0  # steps between eval losses; 0: only at the end
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    export: bool = True  # write the trained model as an HF checkpoint at the end

    def __post_init__(self):
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of micro_batch_size={mb}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
    """Local data influence of each probing example on the student's reference loss."""

    warm_state: str = ""  # warm_state.json written by `montessori sft` (or the folder holding it)
    probe: str = ""  # the probing set (JSONL from synthesize, or pairs in any layout sft reads)
    reference: str | None = None  # D_ref; null: the packaged default reference set
    prompt_field: str = "instruction"
    response_field: str = "response"
    system: str | None = None
    estimator: Literal["exact", "first_order", "both"] = "exact"
    batch_size: int | None = None  # probing examples per vmapped program; null: from a memory estimate
    # D_ref rows per streamed chunk; null: 1 on a CPU (XLA:CPU runs one row of a few hundred
    # tokens faster per token than four), 4 on an accelerator, rounded up to a multiple of
    # mesh.data (grad L_ref splits each chunk's rows over it)
    ref_batch_size: int | None = None
    # distinct padded lengths of the probes (each one more compiled program) and of D_ref's
    # chunks (each one more scan body), planned from their lengths for the least padding
    max_lengths: int = 4
    ref_max_lengths: int = 8
    lr: float | None = None  # null: the lr the warm-up continues at (warm_state.json's lr)
    # clip z's gradient norm before its one step; null: no clipping, as the original's one
    # step (its warm-up clips: that is warmup.optim.grad_clip, a separate key)
    grad_clip: float | None = None
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: the precision probe
    max_len: int = 1024  # probing examples are truncated to this
    ref_max_len: int = 1024  # reference rows are truncated to this
    memory_fraction: float = 0.5  # of device memory the automatic batch size may plan for

    def __post_init__(self):
        for key in ("max_lengths", "ref_max_lengths", "ref_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class PreferencesConfig:
    """Preference pairs within each seed prompt, from the probing examples' influence."""

    scores: str = ""  # scores.jsonl of `montessori influence` (or its output folder)
    probe: str = ""  # the synthesis records that were scored (with seed_prompt and raw_output)
    score_field: str = "influence"  # the score column, e.g. influence_first_order
    mode: Literal["all", "rank"] = "all"  # all: every influence > 0 against every < 0; rank: top against bottom
    top_k: int = 1  # rank: the k best against the k worst samples of each prompt
    min_margin: float = 0.0  # keep a pair when chosen - rejected influence >= this
    max_pairs_per_prompt: int | None = None  # keep the largest margins; null: every pair

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.min_margin < 0:
            raise ValueError(f"min_margin={self.min_margin} must be >= 0")
        if self.max_pairs_per_prompt is not None and self.max_pairs_per_prompt < 1:
            raise ValueError(f"max_pairs_per_prompt={self.max_pairs_per_prompt} must be >= 1 (null: no cap)")


@dataclasses.dataclass(frozen=True)
class DPOOptimConfig(OptimConfig):
    """The original DPO schedule: lr 1e-6, warmup-stable-decay 0.1 / 0.5 / 0.4 down to 1e-3 x lr.
    (A class of its own so that overriding one key keeps these defaults for the others.)"""

    lr: float = 1e-6
    min_lr_ratio: float = 1e-3


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO on the teacher: the seed prompt under its chat template, the raw outputs as answers.
    Defaults are the original's (TRL sigmoid loss, beta 0.1, lr 1e-6 warmup-stable-decay)."""

    pairs: str = ""  # pairs.jsonl of `montessori preferences` (or its output folder)
    system: str | None = None  # the system prompt the teacher had while synthesizing (null: none)
    loss: Literal["sigmoid"] = "sigmoid"
    beta: float = 0.1
    # TRL's keep_end: only when prompt + the longer answer exceed max_len does the prompt keep
    # its last max_prompt_len tokens; if still too long, the answers keep max_len - max_prompt_len
    max_prompt_len: int = 128
    max_len: int = 1024
    batch_size: int = 2  # pairs per optimizer step
    micro_batch_size: int | None = None  # pairs per accumulation step; null: batch_size
    ref_batch_size: int = 8  # pairs per forward of the reference pass
    epochs: int = 1
    max_steps: int | None = None
    eval_fraction: float = 0.0  # pairs held out of training (by seed), measured before and after
    optim: DPOOptimConfig = dataclasses.field(default_factory=DPOOptimConfig)
    ref_cache: str | None = None  # folder of the reference log-prob cache; null: beside the pairs
    log_every: int = 1  # steps between metrics brought to the host
    save_every: int = 100  # steps between checkpoints (and one at the end)
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    export: bool = True  # write the trained teacher as an HF checkpoint at the end

    def __post_init__(self):
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size < 1 or self.batch_size % mb:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of micro_batch_size={mb}")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0")
        if not 0 < self.max_prompt_len < self.max_len:
            raise ValueError(f"need 0 < max_prompt_len ({self.max_prompt_len}) < max_len ({self.max_len})")
        if self.ref_batch_size < 1:
            raise ValueError(f"ref_batch_size={self.ref_batch_size} must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in [0, 1)")


# Schema defaults the synthesis stage shares (its filters and seed loader import them).
INSTRUCTION_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
    "map", "maps", "draw", "draws", "plot", "plots", "go to",
)
SEED_FIELDS = ("instruction", "input", "output", "instances")


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
    preamble: str | None = None  # null: prompts.DEFAULT_PREAMBLE (or prompt_file)
    prompt_file: str | None = None  # the preamble read from this UTF-8 file; not with `preamble`
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
    blacklist: tuple[str, ...] = INSTRUCTION_BLACKLIST  # whole words/phrases, any case
    rouge_threshold: float = 0.7  # drop when ROUGE-L F1 > this against a seed or a kept instruction
    # what an instruction's ROUGE-L is compared against, besides the instructions kept so far:
    # pool: every seed of the pool; shown: only the examples shown in the prompts of the same
    # round (the original's batch of prompts; set prompts_per_round to its batch size)
    rouge_against: Literal["pool", "shown"] = "pool"
    # true: as the original, the first character upper-cased and the rest lower-cased
    # (str.capitalize) before the filters and in the records
    lowercase_instructions: bool = False
    splits: dict[str, int | float] | None = None  # e.g. {warmup: 100, probe: 400}, or fractions
    # a seed prompt's records go to the `probe` split first when it has at least this many
    # (DPO pairs probes within a prompt, so a lone probe can never be paired); 1: plain order
    probe_min_samples: int = 1
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
        if self.probe_min_samples < 1:
            raise ValueError(f"probe_min_samples={self.probe_min_samples} must be >= 1")
        if self.preamble is not None and self.prompt_file is not None:
            raise ValueError("preamble and prompt_file are both set; give one (the text, or a file holding it)")
        if not 0 < self.rouge_threshold <= 1:
            raise ValueError(f"rouge_threshold={self.rouge_threshold} must be in (0, 1]")
        for key in self.seed_fields or {}:
            if key not in SEED_FIELDS:
                raise ValueError(f"seed_fields: unknown field '{key}'; mappable: {', '.join(SEED_FIELDS)}")
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
class EvalConfig:
    """Evaluation of a student: reference-answer NLL on held-out pairs, answers to prompts."""

    data: str = "default"  # held-out pairs (JSONL or HF dataset); "default": the packaged eval set
    split: str = "train"  # the split of an HF dataset
    prompt_field: str = "instruction"  # also read: `input` appended, or chat `messages`
    response_field: str = "response"  # `output` is accepted when this field is absent
    system: str | None = None  # a system prompt for every row (scoring and answers)
    max_len: int = 1024  # longer pairs are truncated (and counted)
    batch_size: int = 8  # pairs per scoring program
    answers: bool = True  # generate answers to the prompts; false: NLL only
    prompts: str | None = None  # JSONL of `prompt`, `messages` or `instruction` rows; null: the eval set's
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    answer_batch_size: int = 16  # rows the sampler decodes at once
    reference: str | None = None  # D_ref the eval set must not repeat; null: influence.reference or the packaged one
    seed_pool: str | None = None  # the seed pool it must not repeat; null: synthesis.seed_pool
    on_overlap: Literal["warn", "error"] = "warn"  # when it repeats an instruction of either
    alpaca_eval: str | None = None  # AlpacaEval prompts (JSON list, JSONL, HF dataset) -> OUT/alpaca_eval/model_outputs.json
    alpaca_eval_split: str = "eval"  # the split of an HF dataset given as alpaca_eval
    mt_bench: str | None = None  # FastChat question.jsonl -> OUT/mt_bench/model_answer/NAME.jsonl
    mt_bench_temperatures: dict[str, float] | None = None  # category -> temperature, over FastChat's table

    def __post_init__(self):
        for name in ("max_len", "batch_size", "max_new_tokens", "answer_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """`montessori judge` and, in `montessori run`, the pairwise MT-Bench judgment of the
    Montessori student against the Self-Instruct student (base_url null: off)."""

    base_url: str | None = None  # an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    model: str = "gpt-4"  # the judge model's name at that endpoint
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (unset: no key)
    prompts: str | None = None  # a JSON/YAML file of judge prompts over the built-in ones
    references: str | None = None  # FastChat reference answers (math, reasoning, coding)
    concurrency: int = 4  # requests in flight
    max_retries: int = 5  # per request, on connection errors, 429 and 5xx
    backoff: float = 1.0  # seconds before the first retry; doubled each time
    max_tokens: int = 1024  # of a judge's reply
    bootstrap: int = 1000  # resamples for the win rate's 95% interval
    seed: int = 0  # of the bootstrap

    def __post_init__(self):
        for name in ("concurrency", "bootstrap", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_retries < 0 or self.backoff < 0:
            raise ValueError("max_retries and backoff must be >= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """`montessori run`: which arms of the paper's comparison, how many iterations, and the
    size of the training set each student is trained on (the same for both arms)."""

    arm: Literal["montessori", "self_instruct", "both"] = "montessori"
    iterations: int = 1  # iteration k+1 starts from iteration k's student (and optimized teacher)
    train_instructions: int = 64  # instructions in each student's training set
    train_max_prompts: int | None = None  # the training synthesis' prompt budget; null: synthesis' rule
    eval_base: bool = True  # also evaluate the initial student (iteration 0)
    # after DPO: influence on the warm student of the optimized teacher's training instructions
    # against the initial teacher's (the Self-Instruct arm's training set with arm=both, else the
    # probing set), with influence.estimator; the run's report shows the difference and its CI
    teacher_shift: bool = True
    shift_instructions: int | None = None  # instructions per teacher; null: all (the smaller set's size)

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"iterations={self.iterations} must be >= 1")
        if self.train_instructions < 1:
            raise ValueError(f"train_instructions={self.train_instructions} must be >= 1")
        if self.shift_instructions is not None and self.shift_instructions < 2:
            raise ValueError(f"shift_instructions={self.shift_instructions} must be >= 2 (null: all)")


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """Where synthesis and eval answers are sampled: ``jax`` (the in-process sampler) or
    ``openai`` (an OpenAI-compatible server: vLLM, SGLang or ``montessori serve``)."""

    backend: Literal["jax", "openai"] = "jax"
    base_url: str | None = None  # openai: the server's API root, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # openai: the model id to request; None: the server's only model
    api_key_env: str | None = "OPENAI_API_KEY"  # the environment variable holding the key (unset: no key)
    max_concurrency: int = 16  # requests in flight at once
    timeout: float = 600.0  # seconds per request

    def __post_init__(self):
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency} must be >= 1")
        if not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout} must be > 0")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("base_url is needed with backend openai")


@dataclasses.dataclass(frozen=True)
class Config:
    """One run: the seed, both models, the mesh they are placed on, and each stage's section.

    ``warmup`` is the student's warm-up before influence (step 2), ``sft`` its training on the
    synthesized set (step 5); ``montessori sft`` alone reads ``sft``.
    """

    seed: int = 0
    teacher: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    student: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    # the original warm-up is all warmup: it ends at the peak lr, the lr influence steps with
    warmup: SFTConfig = dataclasses.field(default_factory=lambda: SFTConfig(
        export=False, optim=OptimConfig(warmup_ratio=1.0, stable_ratio=0.0, decay_ratio=0.0)))
    synthesis: SynthesisConfig = dataclasses.field(default_factory=SynthesisConfig)
    influence: InfluenceConfig = dataclasses.field(default_factory=InfluenceConfig)
    preferences: PreferencesConfig = dataclasses.field(default_factory=PreferencesConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    generation: BackendConfig = dataclasses.field(default_factory=BackendConfig)


# ---------------------------------------------------------------------------------------------
# Loading: YAML file, then overrides, then validation.


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Reads the YAML preset at ``path`` (if any), applies dotted overrides, validates into ``cls``.

    An override is ``a.b.c=value``; the value is parsed as YAML (``1e-6``, ``true``, ``[1, 2]``,
    ``null``). It replaces what the file had at that key, and may name a section the file lacks
    (the defaults fill the rest) or an entry of a dict-typed field.
    """
    data, lines = ({}, {}) if path is None else _read_yaml(path)
    for text in overrides:
        _apply_override(data, lines, text)
    return from_dict(cls, data, source=path, lines=lines)


def _read_yaml(path: str) -> tuple[dict, dict[str, int | str]]:
    """The file's top-level mapping as plain data, and the line of every dotted key in it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    loader = _Loader(text)
    lines: dict[str, int | str] = {}
    try:
        node = loader.get_single_node()
        data = {} if node is None else _plain(loader, node, "", lines)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(str(e))}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}, line {node.start_mark.line + 1}: the top level must be a mapping of keys, "
            f"got {_type_name(type(data))}"
        )
    return data, lines


def _plain(loader: yaml.SafeLoader, node: yaml.Node, path: str, lines: dict) -> Any:
    """Constructs ``node`` as plain data, recording the 1-based line of each key under ``path``."""
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<: *anchor` merges
        out = {}
        for key_node, value_node in node.value:
            mark = key_node.start_mark
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.MarkedYAMLError(problem="a key must be a plain value", problem_mark=mark)
            key = loader.construct_object(key_node)
            if key in out:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=mark)
            key_path = _join(path, str(key))
            lines[key_path] = mark.line + 1
            out[key] = _plain(loader, value_node, key_path, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        out = []
        for i, item in enumerate(node.value):
            lines[f"{path}[{i}]"] = item.start_mark.line + 1
            out.append(_plain(loader, item, f"{path}[{i}]", lines))
        return out
    return loader.construct_object(node, deep=True)


def _apply_override(data: dict, lines: dict[str, int | str], text: str) -> None:
    """Sets ``a.b.c=value`` in the nested ``data``; ``lines`` learns the override as the key's origin."""
    origin = f"override {text!r}"
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"{origin}: expected dotted.key=value")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or _one_line(str(e))
        raise ConfigError(f"{origin}: invalid YAML value: {problem}") from None
    node, path = data, ""
    for part in parts[:-1]:
        path = _join(path, part)
        if not isinstance(node.get(part), dict):  # absent, null or a scalar: a fresh section
            node[part] = {}
            _forget(lines, path)
            lines[path] = origin
        node = node[part]
    node[parts[-1]] = value
    path = _join(path, parts[-1])
    _forget(lines, path)
    lines[path] = origin


def _forget(lines: dict, path: str) -> None:
    """Drops the recorded origins of ``path`` and of everything under it."""
    for key in [k for k in lines if k == path or k.startswith((path + ".", path + "["))]:
        del lines[key]


# YAML 1.2 scalars: PyYAML's default (1.1) reads `yes`/`off` as booleans, `1:30` as 90 and
# `1e-6` as a string. Strings are dumped with 1.1 quoting plus the 1.2 float rule, so both
# readers get a dumped file back as it was.
_BOOL, _INT, _FLOAT = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float"))
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$")
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 booleans, integers and floats."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """``SafeDumper`` that also quotes strings a YAML 1.2 reader would take for floats."""


_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


# ---------------------------------------------------------------------------------------------
# Validation: plain data -> frozen dataclass.


def from_dict(
    cls: type[T],
    data: Mapping,
    *,
    source: str | None = None,
    lines: Mapping[str, int | str] | None = None,
    prefix: str = "",
) -> T:
    """Builds the (nested) frozen dataclass ``cls`` from plain data, checking every key and type.

    Args:
      cls: a dataclass; its fields may be str, int, float (an int or a float string is
        accepted), bool, ``X | None``, ``Literal[...]``, nested dataclasses, ``tuple[T, ...]``,
        ``list[T]`` (both stored as tuples), ``dict[str, T]`` or ``Any``.
      data: the mapping of keys to values; a missing key takes the field's default.
      source: the file ``data`` was read from, named in errors.
      lines: where each dotted key came from: a line of ``source`` (int) or a description
        such as ``"override 'seed=x'"`` (str). A key not in it reports its parent's origin.
      prefix: the dotted path of ``data`` inside a larger config, for error messages.

    Raises:
      ConfigError: one line, ``ORIGIN: dotted.key: what is wrong``.
    """
    try:
        return _convert(cls, data, prefix)
    except _Invalid as e:
        where = _origin(e.path, source, lines or {})
        raise ConfigError(f"{where}: {e.message}" if where else e.message) from None


class _Invalid(Exception):
    """A problem at a dotted ``path``; ``from_dict`` adds where the value came from."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path, self.message = path, message


class _WrongType(_Invalid):
    """The value at ``path`` is not of the field's type (as opposed to a problem deeper down)."""

    def __init__(self, path: str, tp: Any, value: Any):
        super().__init__(path, f"{path or 'top level'}: expected {_type_name(tp)}, got {_show(value)}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, args, value, path)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _WrongType(path, tp, value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _WrongType(path, tp, value)
        if origin is list or args[-1:] == (...,):
            item_types = [args[0]] * len(value)
        elif len(args) == len(value):
            item_types = list(args)
        else:
            raise _WrongType(path, tp, value)
        return tuple(_convert(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _WrongType(path, tp, value)
        key_type, value_type = args
        return {
            _convert(key_type, k, path): _convert(value_type, v, _join(path, str(k))) for k, v in value.items()
        }
    if tp in (str, int, float, bool, type(None)):
        return _convert_scalar(tp, value, path)
    raise TypeError(f"config field {path!r}: unsupported annotation {tp!r}")


def _convert_scalar(tp: type, value: Any, path: str) -> Any:
    """Strict scalars: no bool for an int, no float for an int; an int or a numeric string for a float."""
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(value, tp):
        return value
    raise _WrongType(path, tp, value)


def _convert_union(tp: Any, args: tuple, value: Any, path: str) -> Any:
    """The first arm of ``X | Y | None`` that accepts ``value``; a lone arm's deeper errors pass through."""
    if value is None and type(None) in args:
        return None
    arms = [a for a in args if a is not type(None)]
    for arm in arms:
        try:
            return _convert(arm, value, path)
        except _WrongType as e:
            if len(arms) == 1 and e.path != path:
                raise
        except _Invalid:
            if len(arms) == 1:
                raise
    raise _WrongType(path, tp, value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type, value: Any, path: str, base: Any = None) -> Any:
    """An instance of the dataclass ``cls`` from a mapping; keys it lacks come from ``base``
    (an instance) when given, else from the fields' defaults.

    A ``ValueError`` from ``__post_init__`` (a section's own cross-field check) becomes an
    error located at the section.
    """
    if not isinstance(value, Mapping):
        raise _WrongType(path, cls, value)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            level = f"under '{path}'" if path else "at the top level"
            raise _Invalid(
                _join(path, str(key)),
                f"unknown key '{_join(path, str(key))}'; valid keys {level}: {', '.join(sorted(fields))}",
            )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        default = getattr(base, name) if base is not None else _field_default(f)
        if name not in value:
            if base is not None:
                kwargs[name] = default
        elif dataclasses.is_dataclass(default) and isinstance(value[name], Mapping):
            # a partly given section keeps the other values of its default instance (which
            # may differ from its class's defaults, e.g. the responses' temperature 0.6)
            kwargs[name] = _build(type(default), value[name], _join(path, name), base=default)
        else:
            kwargs[name] = _convert(hints[name], value[name], _join(path, name))
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in value:
            raise _Invalid(path, f"missing required key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise _Invalid(path, f"{path or 'top level'}: {_one_line(str(e))}") from None


def _origin(path: str, source: str | None, lines: Mapping[str, int | str]) -> str:
    """Where the value at ``path`` (or its nearest recorded parent) came from, or ''."""
    while True:
        found = lines.get(path)
        if isinstance(found, str):
            return found
        if isinstance(found, int):
            return f"{source}, line {found}" if source else f"line {found}"
        if not path:
            return source or ""
        path = path[: max(path.rfind("."), path.rfind("["), 0)]


def _type_name(tp: Any) -> str:
    """A reader's name for an annotation: ``bool``, ``one of 'a', 'b'``, ``list of int or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list or (origin is tuple and args[-1:] == (...,)):
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(tp, "__name__", repr(tp))


def _show(value: Any) -> str:
    """``'yes' (str)``: a value and its type, kept short and on one line."""
    if value is None:
        return "null"
    text = _one_line(repr(value))
    return f"{text[:57] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Output: plain data, YAML, and what changed.


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a config; ``from_dict(cls, to_dict(x)) == x``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(obj: Any) -> str:
    """The config as YAML, in field order; ``load_config`` reads it back to an equal config."""
    return yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


_ABSENT = object()


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {**a, **b}  # a's order, then keys only b has
        return [
            changed
            for key in keys
            for changed in _diff(a.get(key, _ABSENT), b.get(key, _ABSENT), _join(path, str(key)))
        ]
    return [] if a == b else [path]


def diff(a: Any, b: Any) -> list[str]:
    """The dotted keys whose values differ between two configs, or two plain nested dicts
    (``to_dict``'s kind, e.g. the settings a checkpoint was saved with), in a's field order
    and then keys only b has. Two configs of different classes are a TypeError."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is not type(b):
        raise TypeError(f"cannot diff a {type(a).__name__} with a {type(b).__name__}")
    return _diff(to_dict(a), to_dict(b), "")
