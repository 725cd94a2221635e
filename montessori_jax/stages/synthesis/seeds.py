"""Seed pools: the human-written tasks that the first instruction prompts show the teacher.

Accepted sources (``load_seed_pool(source)``):

- ``"default"``: the small pool shipped with the package (``montessori_jax/assets/seed_pool.jsonl``);
- a JSONL file, one task per line;
- an HF ``datasets`` folder (written by ``save_to_disk``, or a dataset repository checkout),
  or a hub id such as ``vicgalle/alpaca-gpt4`` where the machine can reach a hub or has it
  cached.

Row formats, detected per row:

- Alpaca: ``instruction``, ``input`` (may be empty), ``output``;
- Self-Instruct seed tasks: ``instruction``, ``instances: [{input, output}, ...]`` (the first
  instance is used);
- plain: ``instruction`` alone.

Other column names are mapped with ``fields``, e.g. ``{"instruction": "question", "input":
"context"}``. A task's text, as prompts show it and as dedup compares it, is the instruction
followed by its input (``"Summarize the text. <the text>"``), as the original method does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping

from montessori_jax.config import SEED_FIELDS
from montessori_jax.errors import UserError
from montessori_jax.files import PACKAGED_SEED_POOL

DEFAULT_POOL = "default"
FIELDS = SEED_FIELDS


@dataclasses.dataclass(frozen=True)
class SeedTask:
    """One seed task; ``where`` names its origin (``FILE, line N`` or ``DATASET, row N``)."""

    instruction: str
    input: str = ""
    output: str = ""
    where: str = ""

    @property
    def text(self) -> str:
        """The instruction with its input appended after a space, as shown in prompts."""
        return f"{self.instruction} {self.input}" if self.input else self.instruction


def load_seed_pool(source: str = DEFAULT_POOL, fields: Mapping[str, str] | None = None,
                   split: str = "train") -> list[SeedTask]:
    """The tasks of a seed pool, in file order.

    Raises:
      UserError: a missing source, a row that is not a JSON object, lacks a string
        instruction or has a field of the wrong type (naming the file and line), or an empty pool.
    """
    mapping = _field_mapping(fields)
    if source == DEFAULT_POOL:
        source = PACKAGED_SEED_POOL
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        if path.endswith(".json") and not path.endswith(".jsonl"):
            rows = _json_array_rows(path)
        else:
            rows = _jsonl_rows(path)
    elif os.path.isdir(path) or _looks_like_hub_id(source):
        rows = _dataset_rows(source if not os.path.isdir(path) else path, split)
    else:
        raise UserError(f"{source}: no such seed pool (expected a .jsonl file, a datasets folder or a hub id)")
    tasks = [_task(row, where, mapping) for row, where in rows]
    if not tasks:
        raise UserError(f"{source}: the seed pool is empty")
    return tasks


def _field_mapping(fields: Mapping[str, str] | None) -> dict[str, str]:
    mapping = {name: name for name in FIELDS}
    for ours, theirs in (fields or {}).items():
        if ours not in FIELDS:
            raise UserError(f"seed field mapping: unknown field '{ours}'; mappable fields: {', '.join(FIELDS)}")
        mapping[ours] = theirs
    return mapping


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) <= 2 and all(parts) and not source.startswith((".", "~")) and not source.endswith(
        (".jsonl", ".json")
    )


def _jsonl_rows(path: str) -> Iterable[tuple[object, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), f"{path}, line {n}"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    return rows


def _json_array_rows(path: str) -> Iterable[tuple[object, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of tasks (or a .jsonl file)")
    return [(row, f"{path}, item {i}") for i, row in enumerate(data)]


def _dataset_rows(source: str, split: str) -> Iterable[tuple[object, str]]:
    """Rows of an HF dataset: a ``save_to_disk`` folder, a dataset repo folder or a hub id."""
    import datasets

    try:
        if os.path.isdir(source) and (
            os.path.isfile(os.path.join(source, "dataset_info.json"))
            or os.path.isfile(os.path.join(source, "dataset_dict.json"))
        ):
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{source}: no split '{split}' (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, split=split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for a missing or unreadable dataset
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{source}: cannot load the seed dataset: {first}") from None
    return [(row, f"{source}, row {i}") for i, row in enumerate(ds)]


def _task(row: object, where: str, f: Mapping[str, str]) -> SeedTask:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    instruction = row.get(f["instruction"])
    if not isinstance(instruction, str) or not instruction.strip():
        keys = ", ".join(sorted(str(k) for k in row)) or "none"
        raise UserError(
            f"{where}: no '{f['instruction']}' field with a non-empty string (keys: {keys}); "
            "map other names with synthesis.seed_fields"
        )
    inp, out = row.get(f["input"]), row.get(f["output"])
    instances = row.get(f["instances"])
    if inp is None and out is None and instances is not None:
        if not (isinstance(instances, list) and instances and isinstance(instances[0], dict)):
            raise UserError(f"{where}: '{f['instances']}' must be a non-empty list of {{input, output}} objects")
        inp, out = instances[0].get("input"), instances[0].get("output")
    for name, value in (("input", inp), ("output", out)):
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: '{f[name]}' must be a string, got {type(value).__name__}")
    return SeedTask(instruction.strip(), (inp or "").strip(), (out or "").strip(), where)
