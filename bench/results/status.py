"""python -m bench status DIR: where each cell of a run folder's latest sweep stands.

done     its row is `ok` or `skipped`
failed   its row is `error`, `oom`, `timeout` or `diverged` (the error is shown)
running  a live job holds it (a claim refreshed within bench/results/jobs.py STALE_S)
queued   a job that has it is still waiting or running (SLURM's state; a local job's process)
pending  none of these: the same command runs it (`interrupted` when a job held it and ended
         without its row: killed by a time limit, preemption or a node failure)"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from bench.results import jobs as job_records
from bench.results import store
from bench.errors import SpecError

STATES = ("done", "failed", "running", "queued", "pending")


def status(run_dir: Path) -> dict[str, Any]:
    """Where each cell stands. A record that cannot be read (a line of jobs.jsonl, a claim, run.json
    or a part of it, a rows file) is skipped with a one-line warning; the rest is still reported."""
    folder = Path(run_dir)
    if not _is_run_folder(folder):
        raise SpecError(
            f"{folder} is not a run folder (no {store.RUN}, {store.ROWS} or {store.ROWS_DIR}/); "
            "give the --out folder of a sweep"
        )
    record = store.read_run_json(folder) or {}
    rows = store.latest_by_key(store.read_rows(folder))
    cells = _sweep_cells(folder, record) or [{k: row.get(k) for k in CELL_FIELDS} for row in rows.values()]
    launcher = record.get("launcher")
    launcher = launcher.get("launcher") if isinstance(launcher, dict) else None
    config = record.get("config")
    claims = job_records.claims(folder)
    live = {key: c for c in claims if not c["stale"] for key in c.get("cells", [])}
    stale = {key: c for c in claims if c["stale"] for key in c.get("cells", [])}
    jobs = job_records.submitted(folder)
    for job in jobs:
        job["state"] = job_records.job_state(folder, job)
    last_job = {key: job for job in jobs for key in job.get("cells", [])}
    written = Counter(str(row["job"]) for row in rows.values() if row.get("job"))
    entries = []
    for cell in cells:
        row = rows.get(cell["key"])
        job = last_job.get(cell["key"])
        entry = {**cell, "job": None, "note": ""}
        if row is not None and row.get("status") in ("ok", "skipped"):
            entry["state"], entry["job"] = "done", row.get("job")
        elif row is not None and cell["key"] not in live:
            entry["state"], entry["job"] = "failed", row.get("job")
            entry["note"] = f"{row.get('status')}: {row.get('error') or row.get('reason') or ''}".strip()
        elif cell["key"] in live:
            claim = live[cell["key"]]
            entry["state"], entry["job"] = "running", claim.get("job")
            entry["note"] = f"on {claim.get('host')} since {str(claim.get('since', ''))[:19]}"
        elif job is not None and (job["state"] in job_records.SLURM_LIVE or job["state"] == "ALIVE"):
            entry["state"], entry["job"], entry["note"] = "queued", job["job"], job["state"].lower()
        else:
            entry["state"] = "pending"
            if cell["key"] in stale:
                entry["job"] = stale[cell["key"]].get("job")
                entry["note"] = "interrupted: its job stopped refreshing its claim without writing its row"
            elif job is not None and job["state"] == "UNKNOWN":
                entry["job"] = job["job"]
                entry["note"] = "its job's state is unknown here (no sacct, or another host); no row yet"
            elif job is not None:
                entry["job"] = job["job"]
                entry["note"] = f"its job ended ({job['state'].lower()}) without its row"
        entries.append(entry)
    counts = Counter(e["state"] for e in entries)
    for job in jobs:
        job["rows"] = written.get(job["job"], 0)
    return {
        "folder": str(folder),
        "cells": entries,
        "counts": {s: counts.get(s, 0) for s in STATES},
        "jobs": jobs,
        "other_rows": len(set(rows) - {c["key"] for c in cells}),
        "launcher": launcher if isinstance(launcher, str) else "local",
        "config": config if isinstance(config, str) else None,
    }


CELL_FIELDS = {"key": str, "task": str, "estimator": str, "target": str, "steps": int, "seed": int}


def _is_run_folder(folder: Path) -> bool:
    try:
        return folder.is_dir() and any((folder / name).exists() for name in (store.ROWS, store.RUN, store.ROWS_DIR))
    except OSError:  # a name too long for the filesystem
        return False


def _is_cell(entry: Any) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(name), kind) and not isinstance(entry.get(name), bool)
        for name, kind in CELL_FIELDS.items()
    )


def _sweep_cells(folder: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The latest sweep's cells as run.json lists them; entries that are not cells are skipped
    with a warning ([] when run.json has no usable list: the rows stand in for it)."""
    cells = record.get("cells")
    if cells is None:
        return []
    if not isinstance(cells, list):
        warnings.warn(f"{folder / store.RUN}: 'cells' is not a list; the cells are taken from the rows")
        return []
    usable = [cell for cell in cells if _is_cell(cell)]
    if len(usable) < len(cells):
        warnings.warn(
            f"{folder / store.RUN}: skipping {len(cells) - len(usable)} of its {len(cells)} 'cells' that "
            f"are not cells (an object with {', '.join(CELL_FIELDS)})"
        )
    return [{name: cell[name] for name in CELL_FIELDS} for cell in usable]


def print_status(report: dict[str, Any], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    counts = report["counts"]
    total = sum(counts.values())
    console.print(
        f"[bold]{escape(report['folder'])}[/]: {total} cells of the latest sweep"
        f" ({escape(report['launcher'])}{', ' + escape(report['config']) if report['config'] else ''}): "
        + ", ".join(f"{counts[s]} {s}" for s in STATES)
        + (f"; {report['other_rows']} rows of other sweeps" if report["other_rows"] else "")
    )
    shown = [e for e in report["cells"] if e["state"] != "done"]
    if shown:
        table = Table(title="cells not done")
        for column in ("state", "task", "estimator", "target", "N", "seed", "job", "detail"):
            table.add_column(column, overflow="fold")
        for e in sorted(shown, key=lambda e: STATES.index(e["state"])):
            table.add_row(
                e["state"],
                escape(str(e["task"])),
                escape(str(e["estimator"])),
                str(e["target"]),
                str(e["steps"]),
                str(e["seed"]),
                str(e["job"] or "-"),
                escape(e["note"]),
            )
        console.print(table)
    if report["jobs"]:
        table = Table(title="jobs (OUT/jobs.jsonl)")
        for column in ("job", "launcher", "submitted", "cells", "rows written", "state"):
            table.add_column(column)
        for job in report["jobs"]:
            table.add_row(
                str(job["job"]),
                job.get("launcher", ""),
                str(job.get("submitted", ""))[:19],
                str(len(job.get("cells", []))),
                str(job["rows"]),
                job["state"],
            )
        console.print(table)
    if counts["pending"] or counts["failed"]:
        console.print("the same `python -m bench run` command runs the pending cells (--force reruns failed ones)")
