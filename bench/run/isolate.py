"""One process per cell (`--isolate cell`; the default on CUDA). Each cell runs in a freshly
spawned interpreter: its own CUDA context, allocator and peak counters (nothing another cell
cached or fragmented), and a cell stuck inside a CUDA kernel, which SIGALRM cannot interrupt, is
stopped by killing its process. The price is start-up per cell (imports and task set-up) and a
reference gradient recomputed per cell; on a CPU the forked memory worker already isolates the
memory figures, so `auto` isolates only CUDA sweeps. The parent writes the row the child returns,
so rows.jsonl keeps one writer."""

from __future__ import annotations

import multiprocessing as mp
import signal
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.errors import exception_text
from bench.run.guard import guarded

GRACE_S = 60.0  # beyond --timeout, before the parent kills a child that did not time itself out
STARTUP_S = 600.0  # for the child's imports, before its cell starts


def _serve_cell(conn, payload: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills this process
    try:
        from bench.registry import ESTIMATORS, TASKS, include
        from bench.run.cell import CellRunner
        from bench.run.plan import Cell, SweepSpec

        spec = SweepSpec(**payload["spec"])
        for path in spec.includes:
            include(path)
        cell = Cell(
            TASKS.create(payload["task"]),
            ESTIMATORS.create(payload["estimator"]),
            payload["target"],
            payload["steps"],
            payload["seed"],
            payload["key"],
            payload["identity"],
        )
        runner = CellRunner(spec, Path(payload["out"]))
        conn.send({"started": True})  # imports done: the cell's own clock starts now
        try:
            with guarded():
                kept = {cell.key: payload["kept"]} if payload.get("kept") else {}
                row = next(runner.run_point([cell], (), kept, frozenset(payload.get("remeasure", ()))))
        finally:
            runner.close()
    except BaseException as exc:  # a failure to even build the cell is still the cell's row
        row = {
            "key": payload["key"],
            **payload["identity"],
            "status": "error",
            "error": f"cell process: {type(exc).__name__}: {exception_text(exc)}",
            "error_type": type(exc).__name__,
        }
    conn.send(row)
    conn.close()


def run_in_process(
    spec, cell, out: Path, kept: dict[str, Any] | None = None, remeasure: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The cell's row, computed in a fresh process (or, with its earlier row `kept`, measured
    again as `remeasure` says). Memory there is measured in process (CUDA's counters; on a CPU
    the process's own resident high-water mark)."""
    child_spec = replace(
        spec, memory="inprocess" if spec.memory in ("auto", "process") else spec.memory, isolate="none"
    )
    payload = {
        "spec": asdict(child_spec),
        "task": cell.task.spec,
        "estimator": cell.estimator.spec,
        "target": cell.target,
        "steps": cell.steps,
        "seed": cell.seed,
        "key": cell.key,
        "identity": cell.identity,
        "out": str(out),
        "kept": kept,
        "remeasure": sorted(remeasure),
    }
    context = mp.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_serve_cell, args=(writer, payload), daemon=True)
    process.start()
    writer.close()
    limit = spec.timeout + GRACE_S if spec.timeout else None
    try:
        if not reader.poll(STARTUP_S):
            return cell.row(
                status="error",
                error_type="ProcessStart",
                error=f"cell process did not start within {STARTUP_S:g} s; killed",
            )
        message = reader.recv()
        if "started" not in message:
            return message  # the cell could not even be built: its error row
        if reader.poll(limit):
            return reader.recv()
        return cell.row(
            status="timeout",
            error=f"cell process still running {limit:g} s after its cell started (--timeout + {GRACE_S:g} s); killed",
        )
    except EOFError:
        process.join(timeout=5)
        return cell.row(
            status="error", error_type="ProcessDied", error=f"cell process died with exit code {process.exitcode}"
        )
    finally:
        if process.is_alive():
            process.kill()
        process.join(timeout=10)
        reader.close()
