"""Result rows: one JSON object per line, appended and flushed per cell, in DIR/rows.jsonl (the
local launcher) and DIR/rows.d/<job id>.jsonl (one file per job of a job launcher, bench/run/launch.py).
Reading a run folder merges them and the latest row of a key wins (read_rows says how "latest" is
decided when clocks disagree). A torn last line (a run killed mid-write), any other unusable line
or a rows file that cannot be read is skipped with a warning that names it."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import warnings
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
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
    """Cut a torn last line so that the next append starts on a fresh line. SpecError if the
    rows file is something rows cannot be appended to (a folder, say)."""
    if not path.exists():
        return
    if not path.is_file():
        raise SpecError(f"{path} is not a file, so no row can be appended to it; move it away")
    if path.stat().st_size == 0:
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
            return (
                f"no {kind.__name__} field {name!r}" if name not in row else f"field {name!r} is not a {kind.__name__}"
            )
    return None


def row_files(folder: Path) -> list[Path]:
    """The rows files of a run folder: rows.jsonl, then each job's under rows.d/."""
    folder = Path(folder)
    return [folder / ROWS, *sorted((folder / ROWS_DIR).glob("*.jsonl"))]


def has_rows_files(folder: Path) -> bool:
    """Whether a folder holds a rows file (rows.jsonl, or a job's under rows.d/): a run folder."""
    try:
        return any(path.exists() for path in row_files(folder))
    except OSError:  # a name too long for the filesystem, a folder that cannot be listed
        return False


CLOCK_SKEW_S = 300.0  # a `finished` time at most this far ahead of the reader's clock is taken as it is


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a rows file (in file order), or of every rows file of a run folder in the order
    they were written, so that the last row of a key is its latest (latest_by_key).

    Which row is the latest: within one file, the later line. A file has one writer at a time
    (rows.jsonl: the sweep holding the folder's lock; a job's file: that job), so its append order
    is the order of writing, whatever the clocks said. Across files, the `finished` time, taken as
    at least that of the lines above it in its file (a clock set back cannot reorder a file).

    A `finished` time more than CLOCK_SKEW_S ahead of this machine's clock is not when the row was
    written (a node whose clock is ahead): such a row is placed by the lines above it in its file
    alone, as if written right after them (the oldest of the folder if it is its file's first), so
    that a rerun (--force) on a machine with a right clock supersedes it; a warning names the file.
    Its time counts again once the clock reaches it less CLOCK_SKEW_S (a year 2999 row: never). A
    smaller lead is taken at its word: a rerun within those minutes of such a row loses to it, and
    one after them wins. Rows without a `finished` time (from before it was recorded) are placed
    the same way, by the lines above them."""
    path = Path(path)
    if not path.is_dir():
        return _read_file(path)
    horizon = (datetime.now(timezone.utc) + timedelta(seconds=CLOCK_SKEW_S)).isoformat(timespec="microseconds")
    placed = []
    for file in row_files(path):
        written = ""  # the time this file's lines so far were written by, at least
        ahead = 0
        for row in _read_file(file):
            finished = row.get("finished")
            finished = finished if isinstance(finished, str) else ""
            if finished > horizon:
                ahead += 1
            else:
                written = max(written, finished)
            placed.append((written, row))
        if ahead:
            _warn_once(
                f"{file}: {ahead} row(s) finished more than {CLOCK_SKEW_S:g} s after this machine's "
                "present (a clock ahead?); ordered by their place in the file, not by that time"
            )
    placed.sort(key=lambda item: item[0])  # stable: file order within a file, then row_files' order
    return [row for _, row in placed]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning shown once per process (a folder is read again at every poll of a job launcher)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _read_file(path: Path) -> list[dict[str, Any]]:
    """A line that is torn, not UTF-8, not JSON, not an object or without the identity fields
    (REQUIRED) is skipped with a warning that names it; so is a file that cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:  # a folder named like a rows file, no permission
        warnings.warn(f"{path}: skipped, cannot be read ({exc.strerror or type(exc).__name__})", stacklevel=2)
        return []
    rows = []
    lines = data.split(b"\n")
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
    """The last row of each cell key in `rows` (read_rows' order: a --force rerun supersedes the
    earlier row, even one whose `finished` time lies in the future)."""
    return {row["key"]: row for row in rows if "key" in row}


# What a cell is, read from its row: the cell key hashes these and the code (task_code, task_data,
# estimator_code, reference_code); a row whose readable identity a later row repeats under another
# key ran on code or data that has changed since.
READABLE_IDENTITY = ("schema", "task", "task_version", "estimator", "target", "steps", "seed", "iters", "device", "budget")


def current_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(the latest row of each cell, the number of superseded rows left out): the last row per key,
    then, of rows with the same readable identity under different keys (a sweep rerun after a
    change to the code or the weights), the last one read."""
    latest = list(latest_by_key(rows).values())
    by_cell = {tuple(str(row.get(name)) for name in READABLE_IDENTITY): row for row in latest}
    return list(by_cell.values()), len(latest) - len(by_cell)


def load_frame(run_dir: str | Path):
    """The run's rows as a pandas DataFrame, one row per cell (latest wins; the number of rows
    superseded by a rerun on changed code is in `frame.attrs["superseded"]`)."""
    import pandas as pd

    rows, superseded = current_rows(read_rows(Path(run_dir)))
    frame = pd.DataFrame(rows)
    frame.attrs["superseded"] = superseded
    return frame


LOCK = ".lock"


def writable_folder(folder: Path, flag: str = "--out") -> Path:
    """Create `folder` if needed; SpecError (one line) unless it is a folder this process can write."""
    folder = Path(folder)
    if str(folder).strip() == "":
        raise SpecError(f"{flag} is empty; give a folder")
    try:
        if folder.exists() and not folder.is_dir():
            raise SpecError(f"{flag} {folder} is not a folder (it is a file or a device); give a folder")
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a name longer than the filesystem allows, no permission, a read-only disk
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
            raise SpecError(
                f"another sweep is writing to {folder} ({holder}); wait for it to finish or choose another --out"
            ) from None
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
