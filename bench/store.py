"""Result rows: one JSON object per line in DIR/rows.jsonl, appended and flushed per cell.
A torn last line (a run killed mid-write) is dropped on read with a warning."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

SCHEMA = 1
ROWS = "rows.jsonl"


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
    with open(path, "a") as handle:
        handle.write(json.dumps(row, allow_nan=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / ROWS
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            where = "torn last line" if number >= len(lines) - 1 else f"unreadable line {number}"
            warnings.warn(f"{path}: dropping {where}", stacklevel=2)
    return rows


def latest_by_key(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last row written for each cell key (a --force rerun supersedes the earlier row)."""
    return {row["key"]: row for row in rows if "key" in row}


def load_frame(run_dir: str | Path):
    """The run's rows as a pandas DataFrame, one row per cell (latest wins)."""
    import pandas as pd

    return pd.DataFrame(list(latest_by_key(read_rows(Path(run_dir))).values()))
