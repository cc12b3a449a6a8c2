"""A part's cells run a point at a time (task, target, N, seed), each point's waiting cells through
a cell runner chosen from CELL_RUNNERS: interleaved in this process (the baseline timed beside
them), one by one in this process, or each in a process of its own (bench/run/isolate.py). A failing
cell is a row, never fatal. Every launcher (bench/run/launch.py) runs its cells through run_cells."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from bench.run.cell import CellRunner
from bench.run.guard import children, end_strays, guarded, leave_if_forked
from bench.run.isolate import run_in_process
from bench.run.limits import sigint_recorded
from bench.run.plan import Cell, CodeHashes, SweepSpec, make_cell
from bench.registry import ESTIMATORS


class Inline:
    """Each waiting cell of a point in this process, one after the other (--no-interleave)."""

    name = "inline"

    def __init__(self, spec: SweepSpec, out: Path) -> None:
        self.runner = CellRunner(spec, out)

    def rows(
        self, waiting: list[Cell], companions: list[Cell], kept: dict[str, dict[str, Any]], remeasure: frozenset[str]
    ) -> Iterator[dict[str, Any]]:
        for cell in waiting:
            yield from self.runner.run_point([cell], (), kept, remeasure)

    def close(self) -> None:
        self.runner.close()


class Interleaved(Inline):
    """A point's waiting cells in this process, timed side by side (with the baseline beside them
    when it is not among them)."""

    name = "inline-interleaved"

    def rows(self, waiting, companions, kept, remeasure):
        yield from self.runner.run_point(waiting, companions, kept, remeasure)


class PerProcess:
    """Each cell in a process of its own (--isolate cell, and auto on CUDA): its peak memory from an
    allocator no other cell used, a hung cell stopped by killing its process."""

    name = "process"

    def __init__(self, spec: SweepSpec, out: Path) -> None:
        self.spec, self.out = spec, out

    def rows(self, waiting, companions, kept, remeasure):
        for cell in waiting:
            yield run_in_process(self.spec, cell, self.out, kept.get(cell.key), remeasure)

    def close(self) -> None:
        pass


CELL_RUNNERS: dict[str, Any] = {runner.name: runner for runner in (Interleaved, Inline, PerProcess)}


def cell_runner_name(spec: SweepSpec) -> str:
    """The entry of CELL_RUNNERS a part's settings choose (--isolate, --interleave, the device)."""
    if spec.isolate == "cell" or (spec.isolate == "auto" and spec.device.startswith("cuda")):
        return PerProcess.name
    return Interleaved.name if spec.interleave else Inline.name


def run_cells(
    spec: SweepSpec,
    out: Path,
    cells: list[Cell],
    done: dict[str, dict[str, Any]],
    force: bool,
    write: Callable[[dict[str, Any]], None],
    on_point: Callable[[list[Cell]], None] | None = None,
    kept: dict[str, dict[str, Any]] | None = None,
    remeasure: frozenset[str] = frozenset(),
) -> None:
    """Run `cells` (of one part) a point at a time, calling write(row) as each finishes and
    recording it in `done`. A cell already in `done` is skipped unless force. A cell with a row in
    `kept` is only measured again (`remeasure`: time, memory)."""
    kept = kept or {}
    points: dict[tuple, list[Cell]] = {}
    for cell in cells:
        points.setdefault(cell.point, []).append(cell)
    baseline = ESTIMATORS.create(spec.baseline)
    timed_beside = spec.interleave and baseline.spec in {ESTIMATORS.create(name).spec for name in spec.estimators}
    hashes = CodeHashes()
    runner = CELL_RUNNERS[cell_runner_name(spec)](spec, out)
    try:
        with sigint_recorded(), guarded():
            for point_cells in points.values():
                waiting = [cell for cell in point_cells if force or cell.key not in done]
                if not waiting:
                    continue
                if on_point:
                    on_point(waiting)
                companions = (
                    _baseline_companion(spec, point_cells[0], baseline, waiting, hashes) if timed_beside else []
                )
                before = children()
                for row in runner.rows(waiting, companions, kept, remeasure):
                    leave_if_forked()
                    write(row)
                    done[row["key"]] = row
                end_strays(before)  # what the point's code left running
    finally:
        runner.close()


def _baseline_companion(
    spec: SweepSpec, cell: Cell, baseline: Any, waiting: list[Cell], hashes: CodeHashes
) -> list[Cell]:
    """The point's baseline cell (of the sweep), to be timed beside `waiting` when it is not among
    them (its row exists, or another job runs it)."""
    if any(c.estimator.spec == baseline.spec for c in waiting):
        return []
    return [make_cell(spec, cell.task, baseline, cell.target, cell.steps, cell.seed, hashes)]
