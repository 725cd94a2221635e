"""Instruction prompts: a preamble, then example instructions in ``<instruction>`` tags.

As in Montessori-Instruct (after Self-Instruct): a prompt shows ``shots`` (8) examples. While
fewer than ``generated_shots`` (2) instructions have been kept in the run, all come from the
seed pool; afterwards ``shots - generated_shots`` (6) are seeds and 2 are instructions kept
earlier in the run, and the 8 are shuffled together. The teacher sees the prompt as one plain
user message under its chat template; the exact prompt text is kept with every sample
(``seed_prompt``), because DPO later groups samples by it.

Prompt ``i`` of iteration ``it`` draws from ``numpy.random.default_rng([seed, it, i])``, so the
same seed, prompt index and pool of earlier instructions always give the same prompt,
whatever ran before (a resumed run rebuilds exactly the prompts an uninterrupted one built).

The preamble is ours (``DEFAULT_PREAMBLE``), or text of the user's: ``synthesis.preamble``, or
a UTF-8 file named by ``synthesis.prompt_file`` (``read_preamble``), for example a copy of the
original method's wording.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from montessori_jax.errors import UserError

DEFAULT_PREAMBLE = (
    "Your task is to write one new instruction that a person could give to an AI assistant. "
    "It can be a question or a request, on any subject. It will be used to train language "
    "models, so it must be clear, correct, specific and answerable with text alone.\n"
    "Make the instruction self-contained: if the task needs material to work on (a passage to "
    "summarize, a list to sort, code to fix, numbers to compute with), write that material "
    "right after the instruction, inside the same tags.\n"
    "You may first say in a sentence why your instruction is useful. Then write exactly one "
    "instruction in this format:\n"
    "<instruction>the instruction, followed by its input if it needs one</instruction>\n"
    "Here are some example instructions. Do not copy them; write a different one.\n"
)


def read_preamble(preamble: str | None = None, prompt_file: str | None = None) -> str:
    """The preamble: ``preamble``, else the text of ``prompt_file``, else ``DEFAULT_PREAMBLE``.

    Raises:
      UserError: ``prompt_file`` is missing, unreadable or not UTF-8 (naming the key and path).
    """
    if preamble is not None:
        return preamble
    if prompt_file is None:
        return DEFAULT_PREAMBLE
    try:
        with open(prompt_file, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"synthesis.prompt_file: {prompt_file}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"synthesis.prompt_file: {prompt_file}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"synthesis.prompt_file: {prompt_file}: cannot read ({e.strerror})") from None


def prompt_rng(seed: int, iteration: int, index: int) -> np.random.Generator:
    """The random stream of one prompt: a function of (seed, iteration, prompt index) only."""
    return np.random.default_rng([int(seed) % 2**63, int(iteration), int(index)])


def choose_shots(
    seeds: Sequence[str],
    generated: Sequence[str],
    rng: np.random.Generator,
    shots: int = 8,
    generated_shots: int = 2,
) -> list[str]:
    """The example instructions of one prompt, in display order.

    ``shots`` seeds (without replacement) while ``generated`` has fewer than
    ``generated_shots`` entries; else ``shots - generated_shots`` seeds and ``generated_shots``
    earlier instructions, shuffled together.
    """
    if not 0 <= generated_shots <= shots:
        raise ValueError(f"generated_shots={generated_shots} must be in [0, shots={shots}]")
    n_generated = generated_shots if generated_shots and len(generated) >= generated_shots else 0
    n_seeds = shots - n_generated
    if len(seeds) < n_seeds:
        raise ValueError(f"the seed pool has {len(seeds)} tasks; a prompt needs {n_seeds}")
    chosen = [seeds[i] for i in rng.choice(len(seeds), size=n_seeds, replace=False)]
    if n_generated:
        chosen += [generated[i] for i in rng.choice(len(generated), size=n_generated, replace=False)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def format_prompt(examples: Sequence[str], preamble: str = DEFAULT_PREAMBLE) -> str:
    """The preamble followed by one ``<instruction>...</instruction>`` line per example."""
    return preamble + "".join(f"<instruction>{e}</instruction>\n" for e in examples)


def prompt_examples(
    seeds: Sequence[str],
    generated: Sequence[str],
    *,
    seed: int,
    iteration: int,
    index: int,
    shots: int = 8,
    generated_shots: int = 2,
) -> list[str]:
    """The examples prompt ``index`` of an iteration shows, in display order."""
    return choose_shots(seeds, generated, prompt_rng(seed, iteration, index), shots, generated_shots)


def build_prompt(
    seeds: Sequence[str],
    generated: Sequence[str],
    *,
    seed: int,
    iteration: int,
    index: int,
    shots: int = 8,
    generated_shots: int = 2,
    preamble: str | None = None,
) -> str:
    """Prompt ``index`` of an iteration, given the seed texts and the instructions kept so far."""
    examples = prompt_examples(seeds, generated, seed=seed, iteration=iteration, index=index, shots=shots,
                               generated_shots=generated_shots)
    return format_prompt(examples, DEFAULT_PREAMBLE if preamble is None else preamble)
