"""Crash-safe JSONL output for a synthesis run: append, commit, repair, resume, split.

A run appends its work one *round* at a time (a batch of prompts: their kept records and
their dropped samples), then commits the round by appending one line to ``progress.jsonl``.
Every append is a single write of whole lines, flushed and fsynced before the next file is
touched, in this order: ``records.jsonl``, ``dropped.jsonl``, then ``progress.jsonl``.

A kill can therefore leave, at worst, a round's lines in the data files without its commit
line, and a truncated last line in any file. On resume ``open_run`` reads the committed
rounds, repairs a truncated last line, and cuts each data file back to exactly the rows the
committed rounds account for; the interrupted round then runs again (its prompts are
deterministic). No committed row is lost and none is written twice.

In a cluster every process reads the journal and keeps the same rows in memory; only the
writer (process 0) repairs and appends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence

from montessori_jax.core import distributed
from montessori_jax.errors import UserError
from montessori_jax.files import is_writer, open_append, sync_file

RECORDS, DROPPED, PROGRESS, SUMMARY = "records.jsonl", "dropped.jsonl", "progress.jsonl", "summary.json"


def read_complete_lines(path: str) -> tuple[list[dict], list[int]]:
    """The JSON objects of a JSONL file and the byte offset after each.

    The last line may be cut short (a kill mid-write): when it is not valid JSON it is left
    out (it ends no row); when it is valid JSON but lacks its newline it counts. A bad line
    before the last is an error naming the file and line.
    """
    if not os.path.exists(path):
        return [], []
    with open(path, "rb") as f:
        data = f.read()
    rows, ends = [], []
    pos, lineno = 0, 0
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        last = nl < 0
        end = len(data) if last else nl + 1
        raw = data[pos:end].strip()
        if raw:
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError):
                if last:
                    break
                raise UserError(f"{path}, line {lineno}: not a JSON object; the file is damaged") from None
            rows.append(row)
            ends.append(end)
        pos = end
    return rows, ends


def cut_to_rows(path: str, n_rows: int) -> list[dict]:
    """Keep the first ``n_rows`` complete rows of ``path`` (newline-terminated); returns them.

    Raises UserError when the file has fewer rows than that (it does not match its journal).
    """
    rows, ends = read_complete_lines(path)
    if len(rows) < n_rows:
        raise UserError(
            f"{path}: has {len(rows)} complete rows but the run's progress.jsonl accounts for "
            f"{n_rows}; the folder is damaged (use a new output folder)"
        )
    keep = ends[n_rows - 1] if n_rows else 0
    if not is_writer():  # the writer repairs; the rows kept are the same
        return rows[:n_rows]
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if size != keep:
        with open(path, "r+b") as f:
            f.truncate(keep)
    if n_rows:
        with open(path, "rb") as f:
            f.seek(keep - 1)
            if f.read(1) != b"\n":
                with open(path, "ab") as g:
                    g.write(b"\n")
    return rows[:n_rows]


def append_rows(path: str, rows: Iterable[Mapping]) -> None:
    """Append whole lines in one write, then flush and fsync."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open_append(path) as f:  # in the writer of a cluster only
        if text:
            f.write(text)
            sync_file(f)


class RunJournal:
    """The output folder of one synthesis run.

    ``header`` is the first progress line: the settings that decide what a round produces.
    Resuming with different settings is refused (the rounds would not fit together).
    """

    def __init__(self, out_dir: str, header: Mapping):
        self.out_dir = out_dir
        self.header = json.loads(json.dumps(dict(header)))  # as it reads back (tuples as lists)
        os.makedirs(out_dir, exist_ok=True)
        self.rounds: list[dict] = []
        self.records: list[dict] = []
        self.dropped: list[dict] = []
        self._open()
        # every process has read the committed rounds before the writer appends the next one
        distributed.barrier(f"synthesis/journal:{os.path.abspath(out_dir)}")

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def _open(self) -> None:
        progress = self.path(PROGRESS)
        lines, ends = read_complete_lines(progress)
        if not lines:
            with open_append(progress, "w") as f:  # a fresh run (or a kill mid-header)
                f.write(json.dumps({"header": self.header}, ensure_ascii=False) + "\n")
                sync_file(f)
            for name in (RECORDS, DROPPED):
                open_append(self.path(name), "w").close()
            return
        found = lines[0].get("header")
        if found != self.header:
            found = found if isinstance(found, dict) else {}
            changed = sorted(k for k in set(found) | set(self.header) if found.get(k) != self.header.get(k))
            raise UserError(
                f"{progress}: this folder holds a run made with other settings ({', '.join(changed)}); "
                "rerun with the same settings to resume, or use a new output folder"
            )
        cut_to_rows(progress, len(lines))
        self.rounds = [line for line in lines[1:] if "round" in line]
        self.records = cut_to_rows(self.path(RECORDS), sum(r["kept"] for r in self.rounds))
        self.dropped = cut_to_rows(self.path(DROPPED), sum(sum(r["drops"].values()) for r in self.rounds))

    def commit(self, round_line: Mapping, records: Sequence[Mapping], dropped: Sequence[Mapping]) -> None:
        """Write one round: its records, its dropped samples, then the commit line."""
        append_rows(self.path(RECORDS), records)
        append_rows(self.path(DROPPED), dropped)
        append_rows(self.path(PROGRESS), [round_line])
        self.rounds.append(dict(round_line))
        self.records.extend(records)
        self.dropped.extend(dropped)


def split_bounds(n: int, splits: Mapping[str, int | float],
                 groups: Sequence | None = None) -> dict[str, tuple[int, int]]:
    """Contiguous [start, end) ranges of ``n`` records for each named split, in order.

    Integers are counts; floats are fractions of ``n`` (cumulative, rounded, so fractions that
    sum to 1 cover every record). Raises UserError when the counts need more than ``n``.
    With ``groups`` (one key per record, e.g. its seed prompt), a group is never cut: each
    boundary moves forward to the end of the group it falls in, so a split may hold a few
    records more than asked and the next one as many fewer.
    """
    out = _raw_split_bounds(n, splits)
    if groups is None:
        return out
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group keys for {n} records")

    def snap(b: int) -> int:
        while 0 < b < n and groups[b] == groups[b - 1]:
            b += 1
        return b

    snapped, start = {}, 0
    for name, (_, end) in out.items():
        end = max(start, snap(end))
        snapped[name], start = (start, end), end
    return snapped


def _raw_split_bounds(n: int, splits: Mapping[str, int | float]) -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    fractions = {isinstance(v, float) for v in splits.values()}
    if len(fractions) > 1:
        raise UserError("synthesis.splits: give all counts (integers) or all fractions (floats)")
    if fractions == {True}:
        total = 0.0
        for name, frac in splits.items():
            total += frac
            end = min(n, int(round(total * n)))
            out[name], start = (start, end), end
        return out
    for name, count in splits.items():
        out[name], start = (start, start + count), start + count
    if start > n:
        raise UserError(
            f"synthesis.splits need {start} records ({', '.join(f'{k}={v}' for k, v in splits.items())}) "
            f"but the run has {n}; raise synthesis.num_instructions (or max_prompts) and rerun to continue"
        )
    return out


