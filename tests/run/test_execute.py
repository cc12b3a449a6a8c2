"""One execute loop (bench/run/execute.py) for every launcher: the launchers (bench/run/launch.py's
LAUNCHERS) and the cell runners (bench/run/points.py's CELL_RUNNERS) are table entries, and progress
goes out as events."""

import pytest

from bench.results import store

from bench.run import launch, points
from bench.cli import main
from bench.run.execute import execute
from bench.run.runner import SweepSpec

TOY = "toy[d=2,batch=2]"
SPEC = dict(tasks=[TOY], estimators=["full", "sdo"], targets=["latent"], steps=[2, 3], iters=0, rounds=1, memory="off")
FIGURES = ("status", "grad_cos", "grad_rel_err", "nfe_forward", "nfe_vjp", "reward_curve", "reason")


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps lines at the terminal's width


def _run(spec, out, launch_spec):
    events = []
    rows = execute(spec, out, launch_spec, on_event=events.append)
    return rows, events


def _start_and_rows(events):
    return [
        ("start", e["total"], e["reused"]) if e.kind == "start" else ("row", e["row"]["key"], e["row"]["status"])
        for e in events
        if e.kind in ("start", "row")
    ]


def test_local_and_submitit_local_give_the_same_events_in_the_same_order(tmp_path):
    pytest.importorskip("submitit")
    spec = SweepSpec(**SPEC)
    local_rows, local = _run(spec, tmp_path / "local", launch.LaunchSpec())
    jobs_rows, jobs = _run(spec, tmp_path / "jobs", launch.LaunchSpec(launcher="submitit-local", array_parallelism=1))
    assert _start_and_rows(local) == _start_and_rows(jobs)
    assert _start_and_rows(local)[0] == ("start", 4, 0) and len(local_rows) == len(jobs_rows) == 4
    assert [r["key"] for r in local_rows] == [r["key"] for r in jobs_rows]
    # both end their progress at every cell of the sweep
    assert [e["completed"] for e in local if e.kind == "progress"][-1] == 4
    assert [e["completed"] for e in jobs if e.kind == "progress"][-1] == 4
    assert any(e.kind == "note" and e["text"].startswith("submitted 2 job(s)") for e in jobs)
    # a rerun reuses every row, whichever launcher wrote it
    _, again = _run(spec, tmp_path / "jobs", launch.LaunchSpec())
    assert _start_and_rows(again) == [("start", 4, 4)]


def test_a_launcher_added_to_the_table_is_chosen_by_name(tmp_path, monkeypatch, capsys):
    calls = []

    class Recording(launch.Local):
        name = "recording"
        help = "the local launcher, recording that it ran"

        def run(self, work, done, kept, remeasure, force, tally):
            calls.append([c.key for _, cells in work for c in cells])
            return super().run(work, done, kept, remeasure, force, tally)

    monkeypatch.setitem(launch.LAUNCHERS, Recording.name, Recording)
    out = tmp_path / "run"
    argv = ["run", "--tasks", TOY, "--estimators", "full,sdo", "--targets", "latent", "--steps", "2"]
    argv += ["--iters", "0", "--rounds", "1", "--no-memory", "--no-progress", "--out", str(out)]
    assert main([*argv, "--launcher", "recording"]) == 0
    rows = store.read_rows(out)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(r["key"] for r in rows) and len(rows) == 2
    assert f"rows: {out}" in capsys.readouterr().out
    assert main([*argv, "--launcher", "recording"]) == 0  # resumed: nothing handed to it again
    assert calls[1] == []
    assert "2 of 2 cells already have rows" in capsys.readouterr().err
    # it is an entry like the others: a job option is refused for it as for local
    assert main([*argv, "--launcher", "recording", "--cells-per-job", "2"]) == 2
    assert "cells_per_job is an option of the job launchers" in capsys.readouterr().err


def test_the_cell_runners_table_runs_the_cells(tmp_path, monkeypatch):
    used = []
    for name, runner in list(points.CELL_RUNNERS.items()):

        class Recording(runner):
            def rows(self, waiting, companions, kept, remeasure, _name=name):
                used.append(_name)
                yield from super().rows(waiting, companions, kept, remeasure)

        monkeypatch.setitem(points.CELL_RUNNERS, name, Recording)
    argv = ["run", "--tasks", TOY, "--estimators", "full,truncated[k=1]", "--targets", "latent", "--steps", "2"]
    argv += ["--iters", "1", "--rounds", "1", "--no-memory", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "here"), "--isolate", "none"]) == 0
    assert set(used) == {"inline-interleaved"}
    used.clear()
    assert main([*argv, "--out", str(tmp_path / "apart"), "--isolate", "cell"]) == 0
    assert set(used) == {"process"}
    here = {r["key"]: r for r in store.read_rows(tmp_path / "here")}
    apart = {r["key"]: r for r in store.read_rows(tmp_path / "apart")}
    assert here.keys() == apart.keys() and len(here) == 2
    for key, row in here.items():
        assert all(row.get(f) == apart[key].get(f) for f in FIGURES), (row, apart[key])
