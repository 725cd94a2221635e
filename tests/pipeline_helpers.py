"""Shared by tests/test_pipeline.py and the subprocesses it kills: a tiny-model run config and a
teacher whose sampled text is turned into well-formed instructions.

A random tiny model never closes an ``<instruction>`` tag, so synthesis would keep nothing.
``TaggingTeacher`` runs the real teacher (its jitted sampler, its weights) and maps each sampled
text, deterministically, to an instruction built from a fixed word list; the filters, records,
splits and everything downstream see ordinary data, and a different teacher gives different
instructions.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

WORDS = ("river", "garden", "engine", "lantern", "violin", "harbor", "puzzle", "meadow", "pencil", "rocket",
         "castle", "ocean", "window", "forest", "bridge", "candle", "mirror", "planet", "island", "thunder",
         "spring", "winter", "coffee", "letter", "market", "school", "doctor", "summer", "storm", "valley")


class TaggingTeacher:
    def __init__(self, teacher):
        from montessori_jax.stages.synthesis import TeacherGenerator

        self.inner = TeacherGenerator.load(teacher, batch_size=16)

    @staticmethod
    def _words(text: str, k: int) -> list[str]:
        h = hashlib.sha256(text.encode()).digest()
        return [WORDS[b % len(WORDS)] for b in h[:k]]

    def __call__(self, prompts, params, *, n, seed, row_ids, prefix=""):
        from montessori_jax.stages.synthesis import Completion

        out = self.inner(prompts, params, n=n, seed=seed, row_ids=row_ids, prefix=prefix)
        result = []
        for prompt, samples in zip(prompts, out):
            row = []
            for c in samples:
                key = prompt + "\x00" + c.text
                if n == 1:  # a response
                    text = "The answer uses " + " and ".join(self._words(key, 6)) + "."
                else:
                    text = f"{c.text}<instruction>Write a story about a {' '.join(self._words(key, 5))}.</instruction>"
                row.append(Completion(text, c.finish_reason, c.num_tokens))
            result.append(row)
        return result


SEEDS = ("Write a haiku about rain.", "List three uses of salt.", "Explain what a noun is.",
         "Translate cat into German.", "Give a synonym for quick.", "Sort 3, 1, 2 in order.",
         "Name a planet with rings.", "Describe a sunny morning.", "Suggest a name for a dog.",
         "Summarize why sleep matters.")


def write_small_sets(folder: str) -> tuple[str, str, str]:
    """A 4-row reference set, a 3-row eval set and a 10-task seed pool (all disjoint)."""
    pool = os.path.join(folder, "seeds.jsonl")
    with open(pool, "w") as f:
        for s in SEEDS:
            f.write(json.dumps({"instruction": s}) + "\n")
    ref = os.path.join(folder, "ref.jsonl")
    ev = os.path.join(folder, "eval.jsonl")
    with open(ref, "w") as f:
        for i, (q, a) in enumerate([("Name a color of the sky.", "Blue."), ("What is two plus two?", "Four."),
                                    ("Say hello in French.", "Bonjour."), ("Name a fruit.", "An apple.")]):
            f.write(json.dumps({"id": i, "instruction": q, "response": a}) + "\n")
    with open(ev, "w") as f:
        for i, (q, a) in enumerate([("What is three plus one?", "Four."), ("Name an animal.", "A cat."),
                                    ("Say goodbye in Spanish.", "Adios.")]):
            f.write(json.dumps({"id": i, "instruction": q, "response": a}) + "\n")
    return ref, ev, pool


def tiny_overrides(model: str, ref: str, ev: str, pool: str, arm: str = "both", iterations: int = 2) -> list[str]:
    """Short prompts (4 shots from a pool of short tasks, a one-line preamble) and few tokens."""
    return [
        f"synthesis.seed_pool={pool}", "synthesis.shots=4", "synthesis.generated_shots=1",
        "synthesis.preamble='Write one new task.'",
        f"teacher.path={model}", f"student.path={model}", f"run.arm={arm}", f"run.iterations={iterations}",
        "run.train_instructions=4",
        "synthesis.num_instructions=8", "synthesis.samples_per_prompt=4", "synthesis.prompts_per_round=2",
        "synthesis.batch_size=8", "synthesis.splits={warmup: 0.5, probe: 0.5}",
        "synthesis.instruction_sampling.max_new_tokens=6", "synthesis.response_sampling.max_new_tokens=4",
        "warmup.batch_size=2", "warmup.save_every=1", "warmup.max_len=128",
        f"influence.reference={ref}", "influence.batch_size=2", "influence.ref_batch_size=2",
        "preferences.mode=rank", "dpo.batch_size=2", "dpo.save_every=1", "dpo.max_prompt_len=64", "dpo.max_len=128",
        "sft.batch_size=2", "sft.save_every=1", "sft.max_len=128",
        f"eval.data={ev}", "eval.max_new_tokens=4", "eval.batch_size=4",
    ]


def main(argv: list[str]) -> None:
    """``python pipeline_helpers.py RUN_DIR MODEL REF EVAL POOL``: one Montessori iteration (the
    subprocess the kill test interrupts, and each process of the 2-process cluster test)."""
    from montessori_jax import pipeline
    from montessori_jax.config import Config, load_config
    from montessori_jax.core import distributed

    distributed.initialize()  # a cluster when MONTESSORI_* say so (tests/multiproc.py)

    run_dir, model, ref, ev, pool = argv
    cfg = load_config(Config, None, tiny_overrides(model, ref, ev, pool, arm="montessori", iterations=1))
    pipeline.run(cfg, run_dir, progress=False, generator_factory=TaggingTeacher)


if __name__ == "__main__":
    main(sys.argv[1:])
