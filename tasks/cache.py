"""Where tasks keep what they build or train on first use: $DIFFGRAD_BENCH_CACHE, else
$XDG_CACHE_HOME/diffgrad-bench, else ~/.cache/diffgrad-bench."""

from __future__ import annotations

import os
from pathlib import Path

MIB = 2**20


def cache_root() -> Path:
    root = os.environ.get("DIFFGRAD_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffgrad-bench"
    )
    return Path(root)


def add_file(digest, file: Path, label: str) -> None:
    """Feed `digest` a file's label and size and its first and last MiB: cheap for a 4 GB
    checkpoint, and a retrained or replaced file changes it."""
    size = file.stat().st_size
    digest.update(f"{label}:{size}".encode())
    with open(file, "rb") as handle:
        digest.update(handle.read(MIB))
        if size > 2 * MIB:
            handle.seek(-MIB, os.SEEK_END)
            digest.update(handle.read())
