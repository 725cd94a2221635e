"""From a teacher's raw output to a kept instruction, or to the reason it was dropped.

The steps, in order (each drop is counted under its reason):

1. ``no_instruction_tag``: take the text of the last complete ``<instruction>...</instruction>``
   pair; none: drop. An unclosed trailing tag does not count, so an output cut off at the
   token limit falls back to an earlier complete pair, if any.
2. normalise: ``<input>``/``</input>`` markers are removed (some teachers wrap the input in
   them) and every run of whitespace becomes one space; with ``lowercase=True`` the first
   character is then upper-cased and the rest lower-cased (``str.capitalize``), as the
   original method does.
3. ``too_short`` / ``too_long``: fewer than ``min_chars`` or more than ``max_chars`` characters.
4. ``blacklisted_word``: a whole word or phrase a text model cannot act on (image, graph,
   picture, file, map, draw, plot, go to, and their plurals), any case.
5. ``starts_with_punctuation`` / ``starts_with_non_ascii``.
6. ``too_similar``: ROUGE-L F1 above ``rouge_threshold`` against any instruction kept before
   it in the run, and against every seed (``rouge_against="pool"``) or only the examples shown
   in the prompts of the current round (``"shown"``, the original method's set: its batch of
   prompts is our round; ``set_shown`` gives them).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Iterable, Sequence

from montessori_jax.config import INSTRUCTION_BLACKLIST
from montessori_jax.stages.synthesis.rouge import RougeLIndex

OPEN_TAG, CLOSE_TAG = "<instruction>", "</instruction>"
BLACKLIST = INSTRUCTION_BLACKLIST
DROP_REASONS = (
    "no_instruction_tag",
    "too_short",
    "too_long",
    "blacklisted_word",
    "starts_with_punctuation",
    "starts_with_non_ascii",
    "too_similar",
)
_INPUT_TAG_RE = re.compile(r"</?input>", re.IGNORECASE)
_SPACE_RE = re.compile(r"\s+")


def extract_instruction(raw: str) -> str | None:
    """The text of the last complete ``<instruction>...</instruction>`` pair in ``raw``, or None.

    That is the last opening tag that has a closing tag after it, up to the first such closing
    tag: a trailing opening tag that never closes (an output cut off at the token limit) is
    skipped, and other tags inside the instruction's input (``<b>``, ``<input>``) stay text.
    """
    hi = len(raw)
    while (start := raw.rfind(OPEN_TAG, 0, hi)) >= 0:
        end = raw.find(CLOSE_TAG, start + len(OPEN_TAG))
        if end >= 0:
            return raw[start + len(OPEN_TAG) : end]
        hi = start
    return None


def normalize(instruction: str) -> str:
    """Drop ``<input>`` markers and collapse whitespace to single spaces."""
    return _SPACE_RE.sub(" ", _INPUT_TAG_RE.sub(" ", instruction)).strip()


def blacklist_regex(words: Iterable[str]) -> re.Pattern | None:
    """A case-insensitive whole-word pattern for the phrases (spaces match any whitespace)."""
    alts = [r"\s+".join(map(re.escape, w.split())) for w in words if w.strip()]
    return re.compile(r"\b(?:" + "|".join(alts) + r")\b", re.IGNORECASE) if alts else None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the filters made of one raw output: the instruction (when a tag was found) and
    the drop reason (None when kept)."""

    instruction: str | None
    reason: str | None
    similar_to: str | None = None  # the pool text it was too similar to
    score: float = 0.0  # that ROUGE-L F1

    @property
    def kept(self) -> bool:
        return self.reason is None


class InstructionFilter:
    """The filters of one run; the ROUGE-L pool holds every instruction kept, and the seeds
    (``rouge_against="pool"``) or the examples of the current round's prompts (``"shown"``).

    ``check(raw)`` judges an output without changing anything; ``keep(instruction)`` adds a
    kept instruction to the pool; ``__call__(raw)`` does both. With ``"shown"``, call
    ``set_shown(examples)`` at the start of each round.
    """

    def __init__(
        self,
        seeds: Sequence[str],
        *,
        min_chars: int = 5,
        max_chars: int = 400,
        blacklist: Sequence[str] = BLACKLIST,
        rouge_threshold: float = 0.7,
        rouge_against: str = "pool",
        lowercase: bool = False,
    ):
        if rouge_against not in ("pool", "shown"):
            raise ValueError(f"rouge_against={rouge_against!r} must be 'pool' or 'shown'")
        self.min_chars, self.max_chars = min_chars, max_chars
        self.lowercase = lowercase
        self.rouge_against = rouge_against
        self._blacklist = blacklist_regex(blacklist)
        self._texts = list(seeds) if rouge_against == "pool" else []
        self.index = RougeLIndex(rouge_threshold, self._texts)
        self._shown: list[str] = []
        self._shown_index: RougeLIndex | None = None

    def set_shown(self, examples: Sequence[str]) -> None:
        """The examples the current round's prompts show (``rouge_against="shown"`` only)."""
        if self.rouge_against != "shown":
            raise ValueError("set_shown is for rouge_against='shown'")
        self._shown = list(dict.fromkeys(examples))
        self._shown_index = RougeLIndex(self.index.threshold, self._shown)

    def check(self, raw: str) -> Verdict:
        found = extract_instruction(raw)
        if found is None:
            return Verdict(None, "no_instruction_tag")
        inst = normalize(found)
        if self.lowercase:
            inst = inst.capitalize()
        if len(inst) < self.min_chars:
            return Verdict(inst, "too_short")
        if len(inst) > self.max_chars:
            return Verdict(inst, "too_long")
        if self._blacklist is not None and self._blacklist.search(inst):
            return Verdict(inst, "blacklisted_word")
        if inst[0] in string.punctuation:
            return Verdict(inst, "starts_with_punctuation")
        if not inst[0].isascii():
            return Verdict(inst, "starts_with_non_ascii")
        score, entry = self.index.best_match(inst)
        if entry >= 0:
            return Verdict(inst, "too_similar", self._texts[entry], score)
        if self.rouge_against == "shown":
            if self._shown_index is None:
                raise RuntimeError("rouge_against='shown' needs set_shown() before the round's checks")
            score, entry = self._shown_index.best_match(inst)
            if entry >= 0:
                return Verdict(inst, "too_similar", self._shown[entry], score)
        return Verdict(inst, None)

    def keep(self, instruction: str) -> None:
        self._texts.append(instruction)
        self.index.add(instruction)

    def __call__(self, raw: str) -> Verdict:
        verdict = self.check(raw)
        if verdict.kept:
            self.keep(verdict.instruction)
        return verdict
