"""Where a run came from: the environment (versions, device, threads, git state) and run.json,
which keeps every earlier invocation of the same folder under `history`."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import bench
from bench.results import store


def environment(specs: list, argv: list[str] | None) -> dict[str, Any]:
    import diffusers

    spec = specs[0]
    device = torch.device(spec.device)
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
        "spec": asdict(spec),
        **({"parts": [asdict(s) for s in specs]} if len(specs) > 1 else {}),
        "bench_version": bench.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "device": spec.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        **git_state(),
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def write_run_json(
    out: Path, specs: list, argv: list[str] | None, cells: list, extra: dict[str, Any] | None = None
) -> None:
    """run.json: this invocation (its parts, the keys of its cells for `bench status`, and `extra`,
    e.g. the launcher), with every earlier one under `history` (called under the folder's lock).
    An unreadable run.json is kept aside as run.json.unreadable-<time>, never dropped."""
    path = out / store.RUN
    history: list[Any] = []
    if path.exists():
        previous = store.read_run_json(path)
        if previous is None:
            aside = path.with_name(f"{store.RUN}.unreadable-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
            path.replace(aside)
            history = [{"unreadable_record_moved_to": aside.name}]
        else:
            earlier = previous.pop("history", [])
            history = (earlier if isinstance(earlier, list) else [earlier]) + [previous]
    record = environment(specs, argv)
    record.update(extra or {})
    record["cells"] = [
        {
            "key": c.key,
            "task": c.task.spec,
            "estimator": c.estimator.spec,
            "target": c.target,
            "steps": c.steps,
            "seed": c.seed,
        }
        for c in {c.key: c for c in cells}.values()
    ]
    for earlier in history:  # the cell lists of earlier invocations are not kept
        if isinstance(earlier, dict):
            earlier.pop("cells", None)
    record["history"] = history
    tmp = path.with_name(f".{store.RUN}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
