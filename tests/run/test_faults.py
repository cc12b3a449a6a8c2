"""Plug-in code that misbehaves in the sweep's own process still gives a row per cell and ends
nothing else (issue 21, items 13 and 15-18): an exception that cannot be printed, os._exit, a fork
that carries on, a forked child left sleeping, a cell sleeping past --timeout while its memory is
measured, and an include file that fails only in the memory worker."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOY = "toy[d=2,batch=2]"

MISBEHAVING = textwrap.dedent("""
    import multiprocessing
    import os
    import time

    from bench.api import register_estimator
    from estimators.full import Full

    IN_WORKER = multiprocessing.parent_process() is not None  # the memory worker imports this file too
    if IN_WORKER and os.environ.get("SLOW_IN_WORKER"):
        time.sleep(float(os.environ["SLOW_IN_WORKER"]))  # a slow start each time the worker starts


    class Unprintable(Exception):
        def __str__(self):
            raise ValueError("no text")


    @register_estimator
    class RaisesUnprintable(Full):
        name = "raises-unprintable"
        summary = "raises an exception whose str() raises"
        def estimate(self, problem, rng):
            raise Unprintable()


    @register_estimator
    class ExitsHard(Full):
        name = "exits-hard"
        summary = "calls os._exit"
        def estimate(self, problem, rng):
            os._exit(7)


    @register_estimator
    class ForksAndCarriesOn(Full):
        name = "forks-and-carries-on"
        summary = "forks; the child returns into the sweep"
        def estimate(self, problem, rng):
            os.fork()
            return super().estimate(problem, rng)


    @register_estimator
    class ForksASleeper(Full):
        name = "forks-a-sleeper"
        summary = "forks a child that sleeps, holding the sweep's stdout"
        def estimate(self, problem, rng):
            if os.fork() == 0:
                time.sleep(120)
                os._exit(0)
            return super().estimate(problem, rng)


    @register_estimator
    class SleepsInTheWorker(Full):
        name = "sleeps-in-the-worker"
        summary = "sleeps past any timeout while its memory is measured"
        def estimate(self, problem, rng):
            if IN_WORKER:
                time.sleep(120)
            return super().estimate(problem, rng)
""")


def _sweep(tmp_path: Path, estimators: str, *flags: str, env: dict | None = None, timeout: float = 240):
    plugin = tmp_path / "misbehaving.py"
    plugin.write_text(MISBEHAVING)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--include",
        str(plugin),
        "--tasks",
        TOY,
        "--estimators",
        estimators,
        "--targets",
        "latent",
        "--steps",
        "2",
        "--iters",
        "1",
        "--rounds",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *flags,
    ]
    import os

    start = time.monotonic()
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    rows = (
        [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
        if (out / "rows.jsonl").exists()
        else []
    )
    return done, rows, time.monotonic() - start


def test_a_misbehaving_plug_in_fails_its_own_cell_only(tmp_path):
    estimators = "full,raises-unprintable,exits-hard,forks-and-carries-on,forks-a-sleeper,sdo"
    done, rows, seconds = _sweep(tmp_path, estimators, "--no-memory")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    by_estimator = {}
    for row in rows:
        by_estimator.setdefault(row["estimator"], []).append(row)
    assert sorted(by_estimator) == sorted(estimators.split(","))
    assert all(len(r) == 1 for r in by_estimator.values()), {k: len(v) for k, v in by_estimator.items()}
    assert len({row["key"] for row in rows}) == len(rows)
    (unprintable,) = by_estimator["raises-unprintable"]
    assert unprintable["status"] == "error" and unprintable["error_type"] == "Unprintable"
    (exits,) = by_estimator["exits-hard"]
    assert exits["status"] == "error" and "os._exit(7)" in exits["error"]
    for name in ("full", "forks-and-carries-on", "forks-a-sleeper", "sdo"):
        assert by_estimator[name][0]["status"] == "ok", by_estimator[name][0]
    # the sleeping child held the sweep's stdout: it was ended with the point, not 120 s later
    assert seconds < 100
    # a rerun finds every cell done, the failing ones included
    again, rows_again, _ = _sweep(tmp_path, estimators, "--no-memory")
    assert again.returncode == 0 and len(rows_again) == len(rows)


def test_a_cell_sleeping_past_its_timeout_in_the_memory_worker_times_out_alone(tmp_path):
    """The worker is killed with the sleeping cell and restarted for the next one; the restart (here
    slowed by the include file) is the harness's, not counted against the next cell's --timeout."""
    done, rows, _ = _sweep(tmp_path, "full,sleeps-in-the-worker,sdo", "--timeout", "6", env={"SLOW_IN_WORKER": "4"})
    assert done.returncode == 0, done.stderr[-3000:]
    status = {row["estimator"]: row["status"] for row in rows}
    assert status == {"full": "ok", "sleeps-in-the-worker": "timeout", "sdo": "ok"}, [
        (r["estimator"], r.get("error"), r["phase_s"]) for r in rows
    ]
    measured = [row for row in rows if row["status"] == "ok"]
    assert all(row["peak_mem_bytes"] is not None and "mem_error" not in row for row in measured)
    assert max(row["phase_s"]["harness"] for row in measured) > 4  # the restart, charged to the harness


def test_an_include_that_fails_only_in_the_memory_worker_is_a_memory_error_not_a_traceback(tmp_path):
    plugin = tmp_path / "loads_here_only.py"
    plugin.write_text(
        textwrap.dedent("""
        import multiprocessing
        from bench.api import register_estimator
        from estimators.full import Full
        if multiprocessing.parent_process() is not None:
            raise RuntimeError("cannot load in a child process")
        @register_estimator
        class LoadsHereOnly(Full):
            name = "loads-here-only"
            summary = "loads in the sweep's process only"
    """)
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--include",
            str(plugin),
            "--tasks",
            TOY,
            "--estimators",
            "loads-here-only,sdo",
            "--targets",
            "latent",
            "--steps",
            "2",
            "--iters",
            "0",
            "--rounds",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    assert all("cannot load in a child process" in row["mem_error"] for row in rows)
