"""The sweep: run a plan's cells (bench/plan.py) a point at a time (task, target, N, seed),
each through the phases of a cell (bench/cell.py), in this process or one per cell
(bench/isolate.py), and append one row per cell as it finishes. A failing cell is a row, never
fatal. The names of plan and cell are importable from here too."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from bench import store
from bench.cell import Attempt, CellRunner  # the runner's names, importable from here
from bench.errors import SpecError
from bench.guard import children, end_strays, guarded, leave_if_forked
from bench.isolate import run_in_process
from bench.jobs import busy_cells
from bench.limits import sigint_recorded
from bench.plan import (
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
from bench.provenance import write_run_json
from bench.registry import ESTIMATORS


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
    in those respects only, their other fields kept (gradients are not computed again)."""
    unknown = set(remeasure) - set(REMEASURED)
    if unknown:
        raise SpecError(f"--remeasure {','.join(sorted(unknown))}: valid: {', '.join(REMEASURED)}")
    parts = plan(spec if isinstance(spec, list) else [spec])
    with store.locked(out):
        rows_path = out / store.ROWS
        store.repair(rows_path)
        done = store.latest_by_key(store.read_rows(out))  # rows.jsonl and every job's rows.d file
        write_run_json(out, [s for s, _ in parts], argv, [c for _, cells in parts for c in cells], extra)
        kept = {} if force or not remeasure else {key: row for key, row in done.items() if row.get("status") == "ok"}
        todo = {c.key for _, cells in parts for c in cells if force or c.key not in done or c.key in kept}
        todo -= _held_by_live_jobs(out, todo)
        total = len({c.key for _, cells in parts for c in cells})
        if on_start:
            on_start(total, total - len(todo))

        def write(row: dict[str, Any]) -> None:
            store.append_row(rows_path, row)
            if on_row:
                on_row(row)

        for part, cells in parts:
            run_cells(
                part,
                out,
                [c for c in cells if c.key in todo],
                done,
                True,
                write,
                on_point,
                kept=kept,
                remeasure=frozenset(remeasure),
            )
            todo -= {c.key for c in cells}
    return list({c.key: done[c.key] for _, cells in parts for c in cells if c.key in done}.values())


def _held_by_live_jobs(out: Path, keys: set[str]) -> set[str]:
    """The keys among `keys` that a live job (submitted by any launcher) holds or has queued: not
    run here, whoever asks (--force included), and said once."""
    busy = busy_cells(out)
    held = {key for key in keys if key in busy}
    if held:
        jobs = sorted({busy[key] for key in held})
        warnings.warn(
            f"{len(held)} cell(s) are held by live job(s) {', '.join(jobs)} and are left to them; "
            f"see python -m bench status {out}",
            stacklevel=2,
        )
    return held


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
    isolate = spec.isolate == "cell" or (spec.isolate == "auto" and spec.device.startswith("cuda"))
    runner = None if isolate else CellRunner(spec, out)
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
                for row in _point_rows(spec, runner, companions, waiting, out, isolate, kept, remeasure):
                    leave_if_forked()
                    write(row)
                    done[row["key"]] = row
                end_strays(before)  # what the point's code left running
    finally:
        if runner is not None:
            runner.close()


def _baseline_companion(
    spec: SweepSpec, cell: Cell, baseline: Any, waiting: list[Cell], hashes: CodeHashes
) -> list[Cell]:
    """The point's baseline cell (of the sweep), to be timed beside `waiting` when it is not among
    them (its row exists, or another job runs it)."""
    if any(c.estimator.spec == baseline.spec for c in waiting):
        return []
    return [make_cell(spec, cell.task, baseline, cell.target, cell.steps, cell.seed, hashes)]


def _point_rows(
    spec: SweepSpec,
    runner: CellRunner | None,
    companions: list[Cell],
    waiting: list[Cell],
    out: Path,
    isolate: bool,
    kept: dict[str, dict[str, Any]],
    remeasure: frozenset[str],
) -> Iterator[dict[str, Any]]:
    """Rows of a point's waiting cells: interleaved in this process (with the baseline timed beside
    them when it is not among them), one by one, or each in its own process."""
    if isolate:
        for cell in waiting:
            yield run_in_process(spec, cell, out, kept.get(cell.key), remeasure)
    elif spec.interleave:
        yield from runner.run_point(waiting, companions, kept, remeasure)
    else:
        for cell in waiting:
            yield from runner.run_point([cell], (), kept, remeasure)
