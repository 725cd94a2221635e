"""``synthesize``: the stage that writes the warm-up, probing and training sets.

One round, ``prompts_per_round`` prompts at a time, until ``num_instructions`` are kept or the
prompt budget is spent:

    prompts (8 shots each) ─► teacher, n samples each ─► parse + filters, in sample order
      ─► kept instructions ─► teacher answers each ─► records.jsonl, dropped.jsonl ─► commit

Output folder:

- ``records.jsonl``: one row per kept instruction: ``id``, ``iteration``, ``prompt_index``,
  ``sample_index``, ``seed_prompt`` (the exact prompt text; DPO groups by it), ``raw_output``
  (the teacher's full text for that sample; DPO trains on it), ``instruction``, ``response``,
  ``teacher``, ``instruction_sampling`` and ``response_sampling`` (the parameters and seeds),
  ``finish_reason`` and ``response_finish_reason`` (``stop`` or ``length``);
- ``dropped.jsonl``: every dropped sample with its reason (and what it was too similar to);
- ``progress.jsonl``: the settings, then one commit line per round (see ``records``);
- ``summary.json``: counts: samples = kept + every drop reason + unused (samples left
  unexamined in the last round because the target was already reached);
- one ``NAME.jsonl`` per entry of ``splits``: contiguous slices of ``records.jsonl`` in order.

Rerunning the same call resumes (see ``records``); a larger ``num_instructions`` or
``max_prompts`` extends a finished run.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from montessori_jax import faults
from montessori_jax.config import BackendConfig, MeshConfig, ModelConfig
from montessori_jax.core import sharding, text, weights
from montessori_jax.errors import UserError
from montessori_jax.files import write_json_atomic, write_jsonl_atomic
from montessori_jax.kernels.sampler import Sampler, SamplingParams
from montessori_jax.stages import openai_backend
from montessori_jax.stages.synthesis import prompts as prompts_lib
from montessori_jax.stages.synthesis import records as records_lib
from montessori_jax.stages.synthesis.config import GenerationConfig, SynthesisConfig
from montessori_jax.stages.synthesis.filters import DROP_REASONS, InstructionFilter
from montessori_jax.stages.synthesis.seeds import load_seed_pool

# ---------------------------------------------------------------------------------------------
# Generation: any callable with this signature; the teacher's sampler by default.


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled text and why it ended: ``stop`` (a stop token) or ``length`` (the limit)."""

    text: str
    finish_reason: str = "stop"
    num_tokens: int = 0


class Generator(Protocol):
    """``n`` completions for each user message, each rendered under the chat template.

    ``row_ids`` (one per prompt) and ``seed`` fix the random stream of each prompt's samples.
    ``prefix``: the assistant turn starts with this text (forced, not sampled); each
    completion's text includes it.
    """

    def __call__(
        self, prompts: Sequence[str], params: GenerationConfig, *, n: int, seed: int, row_ids: Sequence[int],
        prefix: str = "",
    ) -> list[list[Completion]]: ...


class TeacherGenerator:
    """The ``Generator`` of a loaded model: chat template, the jitted sampler, detokenize.

    The stop token of a finished sample is not part of its text; special tokens are skipped.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 64, system: str | None = None):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.system = system
        pad = text.pad_id(tokenizer)
        self.sampler = Sampler(model, pad_id=pad)
        self.stop_ids = text.stop_token_ids(tokenizer)

    @classmethod
    def load(cls, teacher: ModelConfig | str, *, batch_size: int = 64, mesh: MeshConfig | None = None
             ) -> "TeacherGenerator":
        """The teacher on ``mesh`` (the config's ``mesh`` section: prompts split over ``data``),
        or on one device without one."""
        cfg = ModelConfig(path=teacher) if isinstance(teacher, str) else teacher
        tokenizer = text.load_tokenizer(cfg.path, cfg.chat_template, key="teacher.chat_template")
        on = sharding.mesh_and_rules(mesh) if mesh is not None else (None, None)
        model = weights.load_model(cfg.path, param_dtype=cfg.param_dtype, dtype=cfg.dtype, mesh=on[0], rules=on[1])
        return cls(model, tokenizer, batch_size=batch_size)

    def __call__(self, prompts, params, *, n, seed, row_ids, prefix=""):
        forced = list(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else []
        ids = [text.encode_prompt(self.tokenizer, p, system=self.system) + forced for p in prompts]
        sampling = SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            presence_penalty=params.presence_penalty, max_new_tokens=params.max_new_tokens, n=n, seed=seed,
        )
        out = self.sampler.generate(ids, sampling, self.stop_ids, batch_size=self.batch_size, row_ids=row_ids)
        return [[self._completion(s, prefix) for s in samples] for samples in out]

    def _completion(self, sample, prefix: str) -> Completion:
        body = sample.tokens[:-1] if sample.finish_reason == "stop" else sample.tokens
        return Completion(prefix + self.tokenizer.decode(body, skip_special_tokens=True), sample.finish_reason,
                          len(sample.tokens))


# ---------------------------------------------------------------------------------------------
# The stage


class OpenAIGenerator:
    """The synthesis ``Generator`` over an OpenAI-compatible server (see ``openai_backend``)."""

    def __init__(self, cfg: BackendConfig, *, system: str | None = None):
        self.client = openai_backend.OpenAIClient(cfg)
        self.system = system

    @property
    def settings(self) -> dict:
        return openai_backend.describe(self.client.cfg, self.client.model)

    def __call__(self, prompts, params, *, n, seed, row_ids, prefix=""):
        def one(item):
            prompt, row = item
            msgs = ([{"role": "system", "content": self.system}] if self.system is not None else [])
            msgs.append({"role": "user", "content": prompt})
            if prefix:
                msgs.append({"role": "assistant", "content": prefix})
            got = self.client.chat(msgs, params, n=n, seed=openai_backend.request_seed(seed, row),
                                   continue_final=bool(prefix))
            return [Completion(prefix + text, finish, tokens) for text, finish, tokens in got]

        return self.client.map(one, list(zip(prompts, row_ids)))


def phase_seed(seed: int, iteration: int, phase: int) -> int:
    """The sampler seed of one phase (0: instructions, 1: responses) of an iteration."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(iteration), phase]).generate_state(1)[0])


def _sampling_record(params: GenerationConfig, n: int, seed: int) -> dict:
    return {**dataclasses.asdict(params), "n": n, "seed": seed}


def _pool_fingerprint(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def _header(cfg: SynthesisConfig, teacher_id: str, seed: int, seed_texts: Sequence[str], preamble: str,
            chat_template: str | None = None) -> dict:
    """The settings a round's output depends on; a resume must match them."""
    keep = ("samples_per_prompt", "prompts_per_round", "shots", "generated_shots", "instruction_prefix",
            "instruction_sampling",
            "response_sampling", "min_chars", "max_chars", "blacklist", "rouge_threshold", "iteration")
    header = {
        "seed": seed,
        "teacher": teacher_id,
        "seed_pool": cfg.seed_pool,
        "seed_pool_sha256": _pool_fingerprint(seed_texts),
        "preamble_sha256": _pool_fingerprint([preamble]),
        **{k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
           for k, v in ((k, getattr(cfg, k)) for k in keep)},
    }
    # settings added later enter the header only when they differ from their defaults, so a
    # folder written before they existed still resumes
    if cfg.rouge_against != "pool":
        header["rouge_against"] = cfg.rouge_against
    if cfg.lowercase_instructions:
        header["lowercase_instructions"] = True
    if chat_template is not None:
        header["chat_template_sha256"] = _pool_fingerprint([chat_template])
    return header


def synthesize(
    cfg: SynthesisConfig,
    out_dir: str,
    *,
    teacher: ModelConfig | str = "smollm2",
    seed: int = 0,
    generator: Generator | None = None,
    progress: bool = True,
    mesh: MeshConfig | None = None,
) -> dict:
    """Run (or resume, or extend) one synthesis stage into ``out_dir``; returns the summary.

    Args:
      cfg: the ``synthesis`` config section.
      out_dir: the output folder (created; an existing one is resumed).
      teacher: the model that writes instructions and responses (a ``ModelConfig`` or a path);
        its path is recorded as ``teacher`` in every row. Loaded only if there is work to do.
      seed: the run's seed: prompts and both sampling phases derive from it and ``cfg.iteration``.
      generator: replaces the teacher's sampler (tests, other engines); see ``Generator``.
      progress: show a progress bar.
      mesh: the config's ``mesh`` section the teacher is placed on (prompts split over
        ``data``); None: one device.

    Raises:
      UserError: a bad seed pool, a folder made with other settings, or splits that need more
        records than the run kept (the records stay; raise the budget and rerun).
    """
    t0 = time.perf_counter()
    pool = load_seed_pool(cfg.seed_pool, cfg.seed_fields, cfg.seed_split)
    seed_texts = [t.text for t in pool]
    if len(seed_texts) < cfg.shots:
        raise UserError(f"{cfg.seed_pool}: the seed pool has {len(seed_texts)} tasks; prompts need shots={cfg.shots}")
    teacher_id = teacher if isinstance(teacher, str) else teacher.path
    preamble = prompts_lib.read_preamble(cfg.preamble, cfg.prompt_file)
    template = None if isinstance(teacher, str) else text.read_chat_template(teacher.chat_template,
                                                                             "teacher.chat_template")
    journal = records_lib.RunJournal(out_dir, _header(cfg, teacher_id, seed, seed_texts, preamble, template))

    filt = InstructionFilter(seed_texts, min_chars=cfg.min_chars, max_chars=cfg.max_chars,
                             blacklist=cfg.blacklist, rouge_threshold=cfg.rouge_threshold,
                             rouge_against=cfg.rouge_against, lowercase=cfg.lowercase_instructions)
    kept = [r["instruction"] for r in journal.records]
    for inst in kept:
        filt.keep(inst)
    next_prompt = journal.rounds[-1]["prompt_end"] if journal.rounds else 0
    target, budget = cfg.num_instructions, cfg.prompt_budget
    seeds = (phase_seed(seed, cfg.iteration, 0), phase_seed(seed, cfg.iteration, 1))
    n = cfg.samples_per_prompt

    def done() -> bool:
        return (target is not None and len(kept) >= target) or next_prompt >= budget

    bar = tqdm(total=target or budget, initial=len(kept) if target else next_prompt, disable=not progress,
               desc="synthesize", unit="instr" if target else "prompt", dynamic_ncols=True)
    while not done():
        if generator is None:
            generator = TeacherGenerator.load(teacher, batch_size=cfg.batch_size, mesh=mesh)
        engine = getattr(generator, "settings", None) or {}  # where a server sampled: recorded
        indices = list(range(next_prompt, min(next_prompt + cfg.prompts_per_round, budget)))
        shown = [prompts_lib.prompt_examples(seed_texts, kept, seed=seed, iteration=cfg.iteration, index=i,
                                             shots=cfg.shots, generated_shots=cfg.generated_shots)
                 for i in indices]
        prompts = [prompts_lib.format_prompt(examples, preamble) for examples in shown]
        if cfg.rouge_against == "shown":
            filt.set_shown([e for examples in shown for e in examples])
        outputs = generator(prompts, cfg.instruction_sampling, n=n, seed=seeds[0], row_ids=indices,
                            prefix=cfg.instruction_prefix)

        new, dropped, drops, unused = _judge(outputs, indices, prompts, filt, n, len(kept), target, cfg.iteration)
        answers = (generator([x[4] for x in new], cfg.response_sampling, n=1, seed=seeds[1],
                             row_ids=[i * n + j for i, j, *_ in new]) if new else [])
        rows = [
            {
                "id": _sample_id(cfg.iteration, i, j),
                "iteration": cfg.iteration,
                "prompt_index": i,
                "sample_index": j,
                "seed_prompt": prompt,
                "raw_output": c.text,
                "instruction": inst,
                "response": answer[0].text,
                "teacher": teacher_id,
                "instruction_sampling": {**_sampling_record(cfg.instruction_sampling, n, seeds[0]), **engine},
                "response_sampling": {**_sampling_record(cfg.response_sampling, 1, seeds[1]), **engine},
                "finish_reason": c.finish_reason,
                "response_finish_reason": answer[0].finish_reason,
            }
            for (i, j, prompt, c, inst), answer in zip(new, answers)
        ]
        journal.commit(
            {"round": len(journal.rounds), "prompt_start": indices[0], "prompt_end": indices[-1] + 1,
             "samples": len(indices) * n, "kept": len(rows), "drops": drops, "unused": unused},
            rows, dropped,
        )
        faults.point("synthesize.round")
        kept.extend(r["instruction"] for r in rows)
        next_prompt = indices[-1] + 1
        bar.update(len(rows) if target else len(indices))
        bar.set_postfix(prompts=next_prompt, dropped=len(journal.dropped))
    bar.close()

    summary = _summary(journal, cfg, out_dir, teacher_id, time.perf_counter() - t0)
    write_json_atomic(journal.path(records_lib.SUMMARY), summary)
    if cfg.splits:
        # a seed prompt's samples stay in one split: DPO pairs them with each other
        ordered = split_order(journal.records, cfg.splits, cfg.probe_min_samples)
        bounds = records_lib.split_bounds(len(ordered), cfg.splits, groups=[r["seed_prompt"] for r in ordered])
        for name, (start, end) in bounds.items():
            path = journal.path(f"{name}.jsonl")
            write_jsonl_atomic(path, ordered[start:end])
            summary["splits"][name] = {"path": path, "rows": end - start}
        write_json_atomic(journal.path(records_lib.SUMMARY), summary)
    return summary


def split_order(records: Sequence[dict], splits, probe_min_samples: int) -> list[dict]:
    """The records in the order the splits cut them: generation order, except that with
    ``probe_min_samples`` > 1 the seed prompts with at least that many records are moved to the
    side of the ``probe`` split (the end when it comes after another split, else the start),
    keeping their order."""
    if probe_min_samples <= 1 or "probe" not in splits:
        return list(records)
    sizes = collections.Counter(r["seed_prompt"] for r in records)
    big = [r for r in records if sizes[r["seed_prompt"]] >= probe_min_samples]
    small = [r for r in records if sizes[r["seed_prompt"]] < probe_min_samples]
    return big + small if list(splits)[0] == "probe" else small + big


def _sample_id(iteration: int, prompt_index: int, sample_index: int) -> str:
    return f"it{iteration}-p{prompt_index:06d}-s{sample_index}"


def _judge(outputs, indices, prompts, filt: InstructionFilter, n: int, n_kept: int, target: int | None,
           iteration: int):
    """Runs the filters over a round's samples in order (prompt, then sample).

    Returns (kept: [(prompt index, sample index, prompt, completion, instruction)], dropped
    rows, drop counts by reason, unused samples: those left once ``target`` is reached).
    """
    drops: collections.Counter = collections.Counter()
    new, dropped, unused = [], [], 0
    for i, prompt, samples in zip(indices, prompts, outputs):
        if len(samples) != n:
            raise RuntimeError(f"the generator returned {len(samples)} samples for prompt {i}, expected {n}")
        for j, c in enumerate(samples):
            if target is not None and n_kept + len(new) >= target:
                unused += 1
                continue
            v = filt(c.text)
            if v.kept:
                new.append((i, j, prompt, c, v.instruction))
                continue
            drops[v.reason] += 1
            dropped.append({"id": _sample_id(iteration, i, j), "prompt_index": i, "sample_index": j,
                            "reason": v.reason, "instruction": v.instruction, "similar_to": v.similar_to,
                            "score": v.score, "raw_output": c.text, "finish_reason": c.finish_reason})
    return new, dropped, dict(drops), unused


def _summary(journal: records_lib.RunJournal, cfg: SynthesisConfig, out_dir: str, teacher_id: str,
             seconds: float) -> dict:
    drops = {reason: 0 for reason in DROP_REASONS}
    for r in journal.rounds:
        for reason, count in r["drops"].items():
            drops[reason] = drops.get(reason, 0) + count
    prompts = journal.rounds[-1]["prompt_end"] if journal.rounds else 0
    reached = cfg.num_instructions is not None and len(journal.records) >= cfg.num_instructions
    return {
        "out_dir": out_dir,
        "records_path": journal.path(records_lib.RECORDS),
        "teacher": teacher_id,
        "iteration": cfg.iteration,
        "rounds": len(journal.rounds),
        "prompts": prompts,
        "samples": sum(r["samples"] for r in journal.rounds),
        "kept": len(journal.records),
        "dropped": sum(drops.values()),
        "drops": drops,
        "unused": sum(r["unused"] for r in journal.rounds),
        "stopped": "num_instructions reached" if reached else "prompt budget spent",
        "splits": {},
        "seconds": round(seconds, 3),
    }


def format_summary(summary: dict) -> str:
    """A few human lines: kept, each drop reason, splits."""
    lines = [
        f"{summary['kept']} instructions kept from {summary['samples']} samples of {summary['prompts']} prompts "
        f"({summary['stopped']}) -> {summary['records_path']}"
    ]
    for reason, count in summary["drops"].items():
        if count:
            lines.append(f"  dropped {count:6d}  {reason}")
    if summary["unused"]:
        lines.append(f"  unused  {summary['unused']:6d}  (target reached within the last round)")
    for name, split in summary["splits"].items():
        lines.append(f"  split {name}: {split['rows']} rows -> {split['path']}")
    return "\n".join(lines)


def run_synthesize(cfg, out_dir: str, *, progress: bool = True) -> dict:
    """The stage from a whole ``Config``: its seed, teacher and ``synthesis`` section, sampled by
    ``generation.backend`` (with ``openai``, the teacher is the server's model, recorded as
    ``openai:MODEL@BASE_URL``)."""
    if cfg.generation.backend == "openai":
        gen = OpenAIGenerator(cfg.generation)
        teacher = f"openai:{gen.client.model}@{cfg.generation.base_url}"
        return synthesize(cfg.synthesis, out_dir, teacher=teacher, seed=cfg.seed, generator=gen, progress=progress)
    return synthesize(cfg.synthesis, out_dir, teacher=cfg.teacher, seed=cfg.seed, progress=progress, mesh=cfg.mesh)


def read_summary(out_dir: str) -> dict:
    with open(os.path.join(out_dir, records_lib.SUMMARY), encoding="utf-8") as f:
        return json.load(f)
