"""Instruction/response pairs from a JSONL file or an HF dataset, in the layouts people have:
(`instruction` [+ `input`], `response` | `output`), or chat `messages`."""

from __future__ import annotations

import dataclasses
import os

from montessori_jax.errors import UserError
from montessori_jax.files import read_jsonl


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example: the prompt (text, or chat messages before the answer) and the answer."""

    prompt: str | tuple
    response: str
    where: str  # "FILE, line N" for error messages
    id: str | int | None = None
    row: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # the source row


def _rows(path: str, split: str):
    """(where, row) for a JSONL file, a saved HF dataset folder, or a hub id."""
    if os.path.isfile(path):
        for row in read_jsonl(path):
            yield f"{path}, line {row.pop('_line')}", row
        return
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: no such file, and reading HF datasets needs `pip install datasets`") from None
    try:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
            ds = datasets.load_from_disk(path)
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
            ds = datasets.load_from_disk(path)[split]
        else:
            ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # datasets raises many kinds for a missing or bad source
        raise UserError(f"{path}: not a JSONL file or a readable HF dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path}, row {i}", dict(row)


def check_messages(messages, where: str) -> None:
    """A conversation row: a list of {role, content} strings ending with the assistant's turn."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise UserError(f"{where}: `messages` must be a list of {{role, content}} strings")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's answer")


def conversation(pair: Pair) -> list[dict]:
    """A pair as chat messages: its prompt (text or messages) and its answer as the last turn."""
    head = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else list(pair.prompt)
    return head + [{"role": "assistant", "content": pair.response}]


def load_pairs(path: str, split: str = "train", prompt_field: str = "instruction",
               response_field: str = "response") -> list[Pair]:
    """Every row as a Pair; a row without a prompt or a response is an error naming it."""
    if not path:
        raise UserError("no data given (set the stage's `data` key)")
    pairs = []
    for where, row in _rows(path, split):
        messages = row.get("messages")
        if isinstance(messages, list) and messages:
            check_messages(messages, where)
            prompt = tuple(dict(m) for m in messages[:-1])
            response = messages[-1]["content"]
        else:
            prompt = row.get(prompt_field)
            response = row.get(response_field, row.get("output"))
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"{where}: no `{prompt_field}` text (or chat `messages`)")
            if not isinstance(response, str):
                raise UserError(f"{where}: no `{response_field}` (or `output`) text")
            extra = row.get("input")
            if isinstance(extra, str) and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
        pairs.append(Pair(prompt, response, where, row.get("id"), row))
    if not pairs:
        raise UserError(f"{path}: no rows")
    return pairs
