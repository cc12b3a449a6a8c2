"""Failure is data: killed or interrupted sweeps lose at most the cells in flight and resume; a
cell over its time limit is a 'timeout' row; a changed estimator never reuses a stale row."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.results import store
from bench.cli import main

ROOT = Path(__file__).resolve().parents[2]
TOY = "toy[d=64,batch=16]"

SLOW = textwrap.dedent('''
    import os, time
    from bench.registry import register_estimator
    from estimators.base import Cost
    from estimators.full import Full

    @register_estimator
    class SlowFull(Full):
        """full, sleeping before each gradient (in the memory worker only, with in_worker=true)."""
        name = "test-slow"
        from bench.options import Option
        options = (Option("sleep", float, 0.05, "seconds per gradient"),
                   Option("in_worker", bool, False, "sleep only in the memory process"))

        def estimate(self, problem, rng):
            if not self.in_worker or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
                time.sleep(self.sleep)
            return super().estimate(problem, rng)
''')


def _sweep_command(out: Path, plugin: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--include",
        str(plugin),
        "--tasks",
        TOY,
        "--estimators",
        "test-slow[sleep=0.05],full,sdo",
        "--targets",
        "latent,cond,weights",
        "--steps",
        "3,4",
        "--iters",
        "2",
        "--rounds",
        "2",
        "--no-memory",
        "--no-progress",
        "--out",
        str(out),
    ]


def _wait_for_rows(path: Path, count: int, process: subprocess.Popen, limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"sweep ended before {count} rows: {process.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"no {count} rows within {limit_s} s")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_a_killed_sweep_keeps_its_rows_and_resumes(tmp_path, how):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW)
    out = tmp_path / "run"
    command = _sweep_command(out, plugin)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(out / "rows.jsonl", 4, process)
    process.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    _, err = process.communicate(timeout=60)
    if how == "ctrl-c":
        assert process.returncode == 130, err
        assert "completed cells are saved" in err and "Traceback" not in err
    before = (out / "rows.jsonl").read_bytes()
    kept = store.read_rows(out)  # every line that is there parses (a torn last line is cut on resume)
    assert 4 <= len(kept) < 18

    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(kept)} of 18 cells already" in result.stderr
    after = (out / "rows.jsonl").read_bytes()
    complete = before[: before.rfind(b"\n") + 1]
    assert after.startswith(complete)  # no completed row lost or rewritten
    rows = store.read_rows(out)
    assert len(rows) == 18 and len(store.latest_by_key(rows)) == 18
    assert {r["status"] for r in rows} <= {"ok", "skipped"}


def test_a_cell_over_its_time_limit_is_a_timeout_row(tmp_path):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW)
    out = tmp_path / "run"
    started = time.perf_counter()
    assert (
        main(
            [
                "run",
                "--include",
                str(plugin),
                "--tasks",
                TOY,
                "--estimators",
                "test-slow[sleep=5],full",
                "--targets",
                "cond",
                "--steps",
                "3",
                "--iters",
                "1",
                "--rounds",
                "1",
                "--no-memory",
                "--no-progress",
                "--timeout",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert time.perf_counter() - started < 30
    rows = {r["estimator"].split("[")[0]: r for r in store.read_rows(out)}
    slow = rows["test-slow"]
    assert slow["status"] == "timeout" and "1 s limit" in slow["error"]
    assert slow["cell_seconds"] < 3
    assert rows["full"]["status"] == "ok"


def test_a_timeout_inside_the_memory_process_replaces_it(tmp_path):
    plugin = tmp_path / "slow_in_worker.py"
    plugin.write_text(SLOW.replace('"test-slow"', '"test-slow-worker"'))  # one registry per process
    out = tmp_path / "run"
    # Latents of 1 MiB: Linux batches its resident-page counters per CPU, so a peak of a few pages
    # (sdo on toy[d=64]) can read 0 (seen once in a full test run). The limit leaves room for the
    # replacement memory process's start-up (imports: about 9 s on a slow day here), which sdo waits for.
    assert (
        main(
            [
                "run",
                "--include",
                str(plugin),
                "--tasks",
                "toy[d=2048,batch=64]",
                "--estimators",
                "test-slow-worker[sleep=60,in_worker=true],sdo",
                "--targets",
                "cond",
                "--steps",
                "3",
                "--iters",
                "1",
                "--rounds",
                "1",
                "--no-progress",
                "--timeout",
                "15",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["estimator"].split("[")[0]: r for r in store.read_rows(out)}
    assert rows["test-slow-worker"]["status"] == "timeout", rows["test-slow-worker"]
    sdo = rows["sdo"]
    assert sdo["status"] == "ok" and sdo["mem_kind"] == "rss_peak" and sdo["peak_mem_bytes"] > 0, sdo


def test_a_changed_estimator_does_not_reuse_its_rows(tmp_path):
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW)
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--include",
        str(plugin),
        "--tasks",
        TOY,
        "--estimators",
        "test-slow[sleep=0],full",
        "--targets",
        "cond",
        "--steps",
        "3",
        "--iters",
        "1",
        "--rounds",
        "1",
        "--no-memory",
        "--no-progress",
        "--out",
        str(out),
    ]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=120)
    plugin.write_text(SLOW.replace("seconds per gradient", "seconds slept per gradient"))
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "1 of 2 cells already" in result.stderr  # full reused, the edited estimator rerun
    rows = store.read_rows(out)
    slow = [r for r in rows if r["estimator"].startswith("test-slow")]
    assert len(slow) == 2 and slow[0]["estimator_code"] != slow[1]["estimator_code"]
    assert json.loads((out / "run.json").read_text())["history"]  # both invocations recorded
