"""Files: JSON and JSONL read with errors that name the line, and written so that a reader
never sees half a file (a temporary name in the same folder, flushed, then renamed over the
target); cached sha256 digests; where the project's shared data sets and the packaged ones
(``montessori_jax/assets``) are.

In a cluster of processes (``core/distributed.py``) every process reads, and one writes: the
writers here (``write_*_atomic``, ``open_append``, ``remove``) do nothing in the other
processes, so a stage calls them in every process alike."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from montessori_jax.errors import UserError


def is_writer() -> bool:
    """Whether this process writes shared files: process 0 of a JAX cluster, or the only
    process (no cluster joined: JAX's backend is not started by asking)."""
    import jax

    return not jax.distributed.is_initialized() or jax.process_index() == 0


class _Discard:
    """What ``open_append`` gives the processes that do not write: a file that keeps nothing."""

    def write(self, text) -> int:
        return len(text)

    def writelines(self, lines) -> None:
        for _ in lines:
            pass

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("not a file: this process does not write shared files")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def open_append(path: str, mode: str = "a"):
    """``open(path, mode)`` (an append or a fresh write, text or bytes) in the writer; in the
    other processes of a cluster, a file object that keeps nothing."""
    if not is_writer():
        return _Discard()
    return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def sync_file(f) -> None:
    """Flush and fsync an ``open_append`` file (nothing for a discarding one)."""
    f.flush()
    if not isinstance(f, _Discard):
        os.fsync(f.fileno())


def remove(path: str) -> None:
    """Delete a file, in the writer only (a missing one is fine)."""
    if is_writer() and os.path.exists(path):
        os.remove(path)


def write_json_atomic(path: str, obj) -> None:
    if not is_writer():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_lines_atomic(path: str, lines: Iterable[str]) -> None:
    """Write ``lines`` (each with its newline) to a temporary name beside ``path``, flush, then
    rename over ``path``; on any error the temporary file goes and ``path`` is untouched.
    Only the writer of a cluster writes (the others still consume ``lines``)."""
    if not is_writer():
        for _ in lines:
            pass
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_jsonl_atomic(path: str, rows: Iterable[Mapping]) -> None:
    """One JSON object per line, written as ``write_lines_atomic`` does."""
    write_lines_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str) -> list[dict]:
    """All rows of a JSONL file; a line that is not a JSON object is an error naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
            row["_line"] = n
            rows.append(row)
    return rows


def read_resumable_jsonl(path: str, parse: Callable[[dict], Any] | None = None, what: str = "row") -> list:
    """The rows of a JSONL file that a stage appends to a whole line at a time (scores, caches,
    generated rows, judgments, metrics), each through ``parse`` when given.

    Only the last line can be cut short by a kill: when it is not a complete row (invalid JSON,
    or ``parse`` raises KeyError, TypeError or ValueError) the writer cuts it off the file;
    when it is complete but lacks its newline, the writer adds it, so the next append starts
    a line of its own. A bad line before the last is an error naming the file and line.
    No file: no rows.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    pieces = data.split(b"\n")  # the last piece is b"" when the file ends with a newline
    rows, keep, needs_newline = [], 0, False
    for lineno, raw in enumerate(pieces, 1):
        complete = lineno < len(pieces)
        if raw.strip():
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise TypeError("not an object")
                rows.append(parse(row) if parse else row)
            except (ValueError, UnicodeDecodeError, KeyError, TypeError):
                if complete:
                    raise UserError(f"{path}:{lineno}: not a {what}; the file is damaged") from None
                break  # the line a kill cut short
            needs_newline = not complete
        keep += len(raw) + complete
    if is_writer():  # the writer repairs the file; every process reads the same rows
        if keep < len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)
        if needs_newline:
            with open(path, "ab") as f:
                f.write(b"\n")
    return rows


def read_json(path: str, *, damaged_ok: bool = False):
    """A JSON file's value; None when the file is not there (or, with ``damaged_ok``, when it
    cannot be read or parsed: the caller then computes it again)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        if damaged_ok:
            return None
        raise


_sha256_cache: dict[tuple, str] = {}


def sha256_file(path: str) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in this process: the
    pipeline's manifest, the DPO reference fingerprint and eval's model fingerprint all hash
    the same weights."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _sha256_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
        _sha256_cache[key] = h.hexdigest()
    return _sha256_cache[key]


def sha256_path(path: str, keep=None) -> str | None:
    """sha256 of a file; of a folder, over its files' relative names and contents in name order
    (only names for which ``keep(name)`` is true, when given); None when nothing is there."""
    if os.path.isfile(path):
        return sha256_file(path)
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if keep is None or keep(rel):
                h.update(rel.encode() + b"\0" + sha256_file(full).encode() + b"\n")
    return h.hexdigest()


SHARED_DATA_ENV = "MONTESSORI_SHARED_DATA"


def shared_data_path(name: str) -> str:
    """A file of the project's shared data sets (the Self-Instruct seed tasks, the original
    reference set) for benchmarks and tests: under $MONTESSORI_SHARED_DATA, else in
    ``shared/data`` beside the repository (a development layout; they are not packaged)."""
    folder = os.environ.get(SHARED_DATA_ENV) or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
    return os.path.normpath(os.path.join(folder, name))


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def packaged_path(name: str) -> str:
    """Path of a data set shipped in ``montessori_jax/assets``."""
    return os.path.join(ASSETS, name)


PACKAGED_EVAL = packaged_path("eval.jsonl")
PACKAGED_REFERENCE = packaged_path("reference.jsonl")
PACKAGED_SEED_POOL = packaged_path("seed_pool.jsonl")
