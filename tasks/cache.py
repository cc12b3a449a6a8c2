"""Where tasks keep what they build or train on first use: $DIFFGRAD_BENCH_CACHE, else
$XDG_CACHE_HOME/diffgrad-bench, else ~/.cache/diffgrad-bench."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("DIFFGRAD_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffgrad-bench"
    )
    return Path(root)
