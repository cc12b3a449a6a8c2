"""Result rows: one JSON object per line, appended and flushed per cell, in DIR/rows.jsonl (the
local launcher) and DIR/rows.d/<job id>.jsonl (one file per job of a job launcher, bench/launch.py).
Reading a run folder merges them; the latest row of a key (by its `finished` time) wins. A torn
last line (a run killed mid-write) or any other unusable line is skipped on read with a warning
that names it."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from bench.errors import SpecError

SCHEMA = 1
ROWS = "rows.jsonl"
ROWS_DIR = "rows.d"
RUN = "run.json"


def now() -> str:
    """UTC time to the microsecond, as ISO 8601 (these strings sort in time order)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def repair(path: Path) -> None:
    """Cut a torn last line so that the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        warnings.warn(f"{path}: dropping a torn last line ({len(data) - keep} bytes)", stacklevel=2)
        handle.truncate(keep)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row (stamped `finished` if it is not) in a single write, flushed to disk."""
    row.setdefault("finished", now())
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row, allow_nan=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


REQUIRED = {"key": str, "status": str, "task": str, "estimator": str, "target": str, "steps": int, "seed": int}


def _row_problem(row: Any) -> str | None:
    """Why a parsed line is not a usable row, or None."""
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    for name, kind in REQUIRED.items():
        value = row.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"no {kind.__name__} field {name!r}" if name not in row else f"field {name!r} is not a {kind.__name__}"
    return None


def row_files(folder: Path) -> list[Path]:
    """The rows files of a run folder: rows.jsonl, then each job's under rows.d/."""
    folder = Path(folder)
    return [folder / ROWS, *sorted((folder / ROWS_DIR).glob("*.jsonl"))]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a rows file, or of every rows file of a run folder in the order they were
    finished (rows without a `finished` time, from before it was recorded, first)."""
    path = Path(path)
    if path.is_dir():
        rows = [row for file in row_files(path) for row in _read_file(file)]
        return sorted(rows, key=lambda row: str(row.get("finished", "")))  # stable: file order otherwise
    return _read_file(path)


def _read_file(path: Path) -> list[dict[str, Any]]:
    """A line that is torn, not UTF-8, not JSON, not an object or without the identity fields
    (REQUIRED) is skipped with a warning that names it."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            problem = _row_problem(row)
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except (json.JSONDecodeError, RecursionError):
            problem = "torn last line" if number >= len(lines) - 1 else "not JSON"
        if problem:
            warnings.warn(f"{path}: skipping line {number}: {problem}", stacklevel=2)
            continue
        rows.append(row)
    return rows


def read_run_json(path: Path) -> dict[str, Any] | None:
    """DIR/run.json as a dict; None (with a warning) if it is missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, OSError) as exc:
        warnings.warn(f"{path}: unreadable ({type(exc).__name__}); ignored", stacklevel=2)
        return None
    if not isinstance(record, dict):
        warnings.warn(f"{path}: not a JSON object; ignored", stacklevel=2)
        return None
    return record


def latest_by_key(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last row written for each cell key (a --force rerun supersedes the earlier row)."""
    return {row["key"]: row for row in rows if "key" in row}


def load_frame(run_dir: str | Path):
    """The run's rows as a pandas DataFrame, one row per cell (latest wins)."""
    import pandas as pd

    return pd.DataFrame(list(latest_by_key(read_rows(Path(run_dir))).values()))


LOCK = ".lock"


def writable_folder(folder: Path, flag: str = "--out") -> Path:
    """Create `folder` if needed; SpecError (one line) unless it is a folder this process can write."""
    folder = Path(folder)
    if str(folder).strip() == "":
        raise SpecError(f"{flag} is empty; give a folder")
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"{flag} {folder} is not a folder (it is a file or a device); give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"{flag} {folder}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"{flag} {folder}: the folder is not writable")
    return folder


@contextmanager
def locked(folder: Path) -> Iterator[Path]:
    """Hold an exclusive lock on a run folder while a sweep writes to it: a second sweep on the same
    folder is refused with a one-line error (SpecError) instead of computing every cell twice."""
    folder = writable_folder(folder)
    path = folder / LOCK
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise SpecError(f"--out {folder}: cannot create {LOCK} ({exc.strerror or exc})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise SpecError(f"another sweep is writing to {folder} ({holder}); wait for it to finish "
                            "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield folder
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
