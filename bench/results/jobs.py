"""The records a run folder keeps of its jobs, read: OUT/jobs.jsonl (every job submitted, with
its cells) and OUT/rows.d/<job>.claim.json (the cells a running job works on, refreshed every
HEARTBEAT_S). The launchers (bench/run/launch.py) write them; `status`, the launchers and a local run
read them here, to know which cells a live job still holds."""

from __future__ import annotations

import json
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from bench.results import store

HEARTBEAT_S = 15.0  # a job refreshes its claim this often ...
STALE_S = 4 * HEARTBEAT_S  # ... and a claim older than this belongs to a job that no longer runs
JOBS = "jobs.jsonl"
JOBS_DIR = "jobs"
SLURM_LIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "STAGE_OUT",
    "SIGNALING",
}


CLAIM_FIELDS = {"job": (str, int), "host": str, "pid": int, "pid_start": (str, type(None)), "cells": list, "since": str}
JOB_FIELDS = {
    "job": (str, int),
    "launcher": str,
    "submitted": str,
    "host": str,
    "cells": list,
    "pid": int,
    "pid_start": (str, type(None)),
}  # pid_start is null for a process that ended before it was read


def _record_problem(record: Any, kinds: dict[str, Any], required: tuple[str, ...]) -> str | None:
    """Why a claim or a jobs.jsonl line is not one (written by another version, or damaged), or None."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    for name in required:
        if name not in record:
            return f"no field {name!r}"
    for name, kind in kinds.items():
        value = record.get(name)
        if name in record and (isinstance(value, bool) or not isinstance(value, kind)):
            return f"field {name!r} has the wrong type ({type(value).__name__})"
    if not all(isinstance(key, str) for key in record.get("cells", [])):
        return "field 'cells' is not a list of cell keys"
    return None


def claims(out: Path) -> list[dict[str, Any]]:
    """Every claim in the folder, each with its file's age and `stale`: its job no longer runs (on
    this host: its process has ended; elsewhere: not refreshed within STALE_S). A claim that cannot
    be read is skipped with a warning (one that vanishes while read was released: silently)."""
    found = []
    for path in sorted((Path(out) / store.ROWS_DIR).glob("*.claim.json")):
        try:
            age = time.time() - path.stat().st_mtime
            record = json.loads(path.read_bytes().decode("utf-8"))
            problem = _record_problem(record, CLAIM_FIELDS, ("job", "cells"))
        except FileNotFoundError:
            continue
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or type(exc).__name__})"
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except (ValueError, RecursionError):
            problem = "not JSON"
        if problem:
            warnings.warn(f"{path}: ignoring this claim: {problem}", stacklevel=2)
            continue
        record["job"] = str(record["job"])
        alive = _alive_here(record)
        record["age_s"], record["stale"] = age, (age > STALE_S) if alive is None else not alive
        found.append(record)
    return found


def submitted(out: Path) -> list[dict[str, Any]]:
    """OUT/jobs.jsonl: every job submitted to this folder, oldest first (a line that is not a job
    record is skipped with a warning, as rows lines are)."""
    path = Path(out) / JOBS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        warnings.warn(f"{path}: skipped, cannot be read ({exc.strerror or type(exc).__name__})", stacklevel=2)
        return []
    jobs = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            problem = _record_problem(record, JOB_FIELDS, ("job",))
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except (ValueError, RecursionError):
            problem = "not JSON"
        if problem:
            warnings.warn(f"{path}: skipping line {number}: {problem}", stacklevel=2)
            continue
        record["job"] = str(record["job"])
        jobs.append(record)
    return jobs


def job_state(out: Path, record: dict[str, Any]) -> str:
    """What the scheduler says of a recorded job: a SLURM state, `ALIVE`/`ENDED` for a local job
    on this host, or `UNKNOWN`."""
    if record.get("launcher") == "slurm":
        try:
            import submitit

            return submitit.SlurmJob(folder=Path(out) / JOBS_DIR, job_id=str(record["job"])).state
        except Exception:
            return "UNKNOWN"
    alive = _alive_here(record)
    return "UNKNOWN" if alive is None else "ALIVE" if alive else "ENDED"


def _alive_here(record: dict[str, Any]) -> bool | None:
    """Whether the process a claim or job record names still runs: known on its own host only
    (pid and start time, so a reused pid is not it), None elsewhere."""
    if record.get("host") == socket.gethostname() and record.get("pid") and record.get("pid_start"):
        return _process_start(int(record["pid"])) == record["pid_start"]
    return None


def _process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat), None once it has ended
    (zombies included): with the pid it names one process, whatever later reuses the pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def busy_cells(out: Path) -> dict[str, str]:
    """Cells a live job holds or will run: key -> job id (fresh claims; jobs still queued or running)."""
    busy: dict[str, str] = {}
    for record in submitted(out):
        state = job_state(out, record)
        if state in SLURM_LIVE or state == "ALIVE":
            busy.update({key: str(record["job"]) for key in record.get("cells", [])})
    for claim in claims(out):
        if not claim["stale"]:
            busy.update({key: str(claim.get("job")) for key in claim.get("cells", [])})
    return busy
