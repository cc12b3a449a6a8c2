"""The sweep in this process: run_sweep, bench/run/execute.py's loop with the local launcher and
callbacks for its events. The cells run a point at a time (bench/run/points.py), each through the
phases of a cell (bench/run/cell.py). The names of plan, cell and points are importable from here too."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

from bench.run.cell import Attempt, CellRunner  # the runner's names, importable from here
from bench.run.execute import Event, execute
from bench.run.launch import LaunchSpec
from bench.run.plan import (
    DEFAULT_ESTIMATORS,
    DEFAULT_STABLE_CAP_S,
    DEFAULT_STEPS,
    DEFAULT_TASK,
    DEFAULT_TIMEOUT_S,
    IDENTITY_FIELDS,
    ISOLATE_MODES,
    MAX_SEED,
    MEMORY_MODES,
    REMEASURED,
    Cell,
    CodeHashes,
    SweepSpec,
    expand,
    make_cell,
    plan,
    reference_estimator,
    resolve,
    timing_threads,
)
from bench.run.points import CELL_RUNNERS, cell_runner_name, run_cells  # the cell runners, importable from here


def run_sweep(
    spec: SweepSpec | list[SweepSpec],
    out: Path,
    force: bool = False,
    argv: list[str] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_point: Callable[[list[Cell]], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    extra: dict[str, Any] | None = None,
    remeasure: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Run, in this process, every cell of the sweep (its parts, one after the other) that has no
    row in the run folder yet (all of them with force); return the rows of the sweep's cells. With
    `remeasure` ({'time', 'memory'} or part of it), the cells whose row is ok are measured again
    in those respects only, their other fields kept (gradients are not computed again). Cells a
    live job holds are left to it, with a warning."""

    def on_event(event: Event) -> None:
        if event.kind == "start" and on_start:
            on_start(event["total"], event["reused"])
        elif event.kind == "point" and on_point:
            on_point(event["cells"])
        elif event.kind == "row" and on_row:
            on_row(event["row"])
        elif event.kind == "warning":
            warnings.warn(event["text"], stacklevel=3)

    rows = execute(spec, out, LaunchSpec(), force=force, argv=argv, extra=extra, remeasure=remeasure, on_event=on_event)
    assert rows is not None  # the local launcher returns once every cell has its row
    return rows
