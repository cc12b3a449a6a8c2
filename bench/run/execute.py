"""One execute loop for every launcher: plan the parts, lock the run folder, make the launcher (a
table entry of bench/run/launch.py's LAUNCHERS, which refuses then if it cannot run here), read the
done rows (a cell skipped as predicted not to fit is not done: bench/run/fit.py), write run.json,
work out what is left (--force, --remeasure's kept rows, the cells a live job holds), report the
start, hand the work to the launcher, report the cells that got no row, and return the sweep's
rows. Progress goes out as events (bench/run/launch.py's Event) to one callback; the CLI turns
them into its bar and lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bench.results import store
from bench.errors import SpecError
from bench.results.jobs import busy_cells
from bench.run.fit import SKIP_KIND
from bench.run.launch import LAUNCHERS, Event, LaunchSpec, Tally
from bench.run.plan import REMEASURED, SweepSpec, plan
from bench.run.provenance import write_run_json


def execute(
    specs: SweepSpec | list[SweepSpec],
    out: Path,
    launch: LaunchSpec | None = None,
    *,
    force: bool = False,
    argv: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    remeasure: frozenset[str] = frozenset(),
    on_event: Callable[[Event], None] | None = None,
) -> list[dict[str, Any]] | None:
    """Run every cell of the sweep (its parts, in order) that has no row in the run folder yet (all
    of them with force; never those a live job holds) through the launcher `launch` names; return
    the rows of the sweep's cells, or None when the launcher returned before they ran (detached,
    stopped waiting). With `remeasure` ({'time', 'memory'} or part of it), the cells whose row is
    ok are measured again in those respects only (in this process only)."""
    launch = launch or LaunchSpec()
    emit = on_event or (lambda event: None)
    unknown = set(remeasure) - set(REMEASURED)
    if unknown:
        raise SpecError(f"--remeasure {','.join(sorted(unknown))}: valid: {', '.join(REMEASURED)}")
    kind = LAUNCHERS[launch.launcher]
    if remeasure and not kind.in_process:
        raise SpecError(f"--remeasure runs in this process: use --launcher local, not {launch.launcher}")
    parts = plan(specs if isinstance(specs, list) else [specs])  # every part checked before anything runs
    cells = [c for _, part_cells in parts for c in part_cells]
    with store.locked(out):
        launcher = kind(launch, out, parts)
        store.repair(out / store.ROWS)
        done = store.latest_by_key(store.read_rows(out))  # rows.jsonl and every job's rows.d file
        # a cell skipped as predicted not to fit is run again: the memory is the machine's, not the cell's
        done = {key: row for key, row in done.items() if row.get("skip_kind") != SKIP_KIND}
        write_run_json(out, [s for s, _ in parts], argv, cells, extra)
        kept = {} if force or not remeasure else {key: row for key, row in done.items() if row.get("status") == "ok"}
        seen: set[str] = set()
        work = []
        for spec, part_cells in parts:
            todo = [c for c in part_cells if (force or c.key not in done or c.key in kept) and c.key not in seen]
            seen.update(c.key for c in part_cells)
            work.append((spec, todo))
        busy = busy_cells(out)
        held = {c.key for _, todo in work for c in todo if c.key in busy}
        if held:
            emit(launcher.held(len(held), sorted({busy[key] for key in held})))
        work = [(spec, [c for c in todo if c.key not in held]) for spec, todo in work]
        work = [(spec, todo) for spec, todo in work if todo]
        wanted = {c.key for _, todo in work for c in todo}
        total = len(seen)
        emit(Event("start", {"total": total, "reused": total - len(wanted)}))
        order = list(dict.fromkeys(c.key for c in cells))
        tally = Tally(order, wanted, done, total, emit)
        rows = launcher.run(work, done, kept, frozenset(remeasure), force, tally)
    if rows is None:
        return None
    missing = wanted - tally.written(rows)
    if missing:
        emit(
            Event(
                "warning",
                {
                    "reason": "missing",
                    "count": len(missing),
                    "text": f"{len(missing)} cell(s) got no row (their job ended before them: killed, timed out "
                    f"or failed); `python -m bench status {out}` shows them, and the same command reruns them",
                },
            )
        )
    return list({c.key: rows[c.key] for c in cells if c.key in rows}.values())
