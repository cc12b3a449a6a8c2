"""Run folders as the job launchers leave them (issue 21): a folder with rows under rows.d/ only
is a run folder for every command; a row stamped in the future (a node whose clock is ahead) does
not outlive the rerun that repairs it; a local job's task does not outlive its controller."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest

from bench.results import store

from bench.run import launch
from bench.cli import main
from bench.run.runner import SweepSpec, run_sweep

TOY = "toy[d=2,batch=2]"
QUICK = ["--iters", "0", "--rounds", "1", "--warmup", "0", "--no-memory", "--no-progress"]
SWEEP = ["run", "--tasks", TOY, "--estimators", "full,sdo", "--targets", "latent", "--steps", "2", *QUICK]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps status lines at the terminal's width


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "local"
    assert main([*SWEEP, "--out", str(out)]) == 0
    return out


def _as_jobs_folder(local: Path, folder: Path) -> Path:
    """The folder a job launcher would have written: the same rows, in a job's file under rows.d/."""
    (folder / store.ROWS_DIR).mkdir(parents=True)
    shutil.copy(local / store.RUN, folder / store.RUN)
    for row in store.read_rows(local / store.ROWS):
        store.append_row(folder / store.ROWS_DIR / "4242.jsonl", {**row, "job": "4242"})
    return folder


# -- item 10: rows.d/ alone is a run folder -------------------------------------------------


def test_report_compare_and_figures_read_a_folder_only_jobs_wrote(local_run, tmp_path, capsys):
    jobs = _as_jobs_folder(local_run, tmp_path / "jobs")
    assert not (jobs / store.ROWS).exists()
    assert main(["report", str(jobs), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.md").read_text()
    assert "Cells: 2 ok" in page and "1 job file(s) under" in page
    assert main(["compare", str(local_run), str(jobs)]) == 0
    assert "2 cells in both runs" in capsys.readouterr().out
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "jobs.toml").write_text(
        f'title = "t"\nkind = "frontier"\nsource = "{jobs}"\nclaim = "c"\n[options]\nsteps = 2\ntarget = "latent"\n'
    )
    assert main(["figures", "--specs", str(specs), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "jobs.png").is_file()


def test_a_folder_with_neither_rows_file_is_still_refused(tmp_path, capsys):
    (tmp_path / store.ROWS_DIR).mkdir()
    for argv in (["report", str(tmp_path)], ["compare", str(tmp_path), str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not a run folder" in err, err


# -- item 12: a row stamped in the future does not outlive its rerun ---------------------------

FUTURE = "2999-01-01T00:00:00.000000+00:00"


def _misdate(local: Path, folder: Path, where: str) -> str:
    """A copy of the run with the full cell's row replaced by an `error` row finished in 2999,
    appended to rows.jsonl or to a job's file: the sdo row comes first, so that order matters."""
    shutil.copytree(local, folder)
    rows = store.read_rows(folder / store.ROWS)
    full = next(row for row in rows if row["estimator"] == "full")
    misdated = {**full, "status": "error", "error": "written by a node whose clock is ahead", "finished": FUTURE}
    store.append_row(folder / store.ROWS if where == "rows.jsonl" else folder / store.ROWS_DIR / "7.jsonl", misdated)
    return full["key"]


@pytest.mark.parametrize("where", ["rows.jsonl", "rows.d"])
def test_a_rerun_supersedes_a_row_finished_in_the_future(local_run, tmp_path, capsys, where):
    folder = tmp_path / "run"
    key = _misdate(local_run, folder, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = store.latest_by_key(store.read_rows(folder))[key]
        # in rows.jsonl the misdated row is the last line of the key; alone in a job's file it has no
        # line above it to date it by, and counts as the oldest row
        assert before["status"] == ("error" if where == "rows.jsonl" else "ok")
        assert main([*SWEEP, "--out", str(folder), "--force"]) == 0
        capsys.readouterr()
        latest = store.latest_by_key(store.read_rows(folder))
        assert latest[key]["status"] == "ok" and latest[key]["finished"] < FUTURE
        frame = store.load_frame(folder)
        assert set(frame["status"]) == {"ok"} and len(frame) == 2
        # run: a plain rerun reuses both cells (nothing written) and returns the repaired rows
        written = len(store.read_rows(folder))
        rows = run_sweep(
            SweepSpec(
                tasks=[TOY],
                estimators=["full", "sdo"],
                targets=["latent"],
                steps=[2],
                iters=0,
                rounds=1,
                warmup=0,
                memory="off",
            ),
            folder,
        )
        assert len(store.read_rows(folder)) == written
        assert {row["key"]: row["status"] for row in rows} == {k: "ok" for k in latest}
    assert main(["status", str(folder)]) == 0
    assert "2 done, 0 failed" in capsys.readouterr().out
    assert main(["report", str(folder), "--out", str(tmp_path / "report")]) == 0
    assert "Cells: 2 ok." in (tmp_path / "report" / "index.md").read_text()


def test_order_within_a_file_is_append_order_and_across_files_time(tmp_path):
    row = {"status": "ok", "task": "t", "estimator": "e", "target": "latent", "steps": 1, "seed": 0}
    jobs = tmp_path / store.ROWS_DIR
    # rows.jsonl: a row, then one from a clock set back: the later line still wins
    store.append_row(tmp_path / store.ROWS, {**row, "key": "a", "finished": "2026-01-05", "v": 1})
    store.append_row(tmp_path / store.ROWS, {**row, "key": "a", "finished": "2026-01-01", "v": 2})
    # a job's row from the future counts as written right after the line above it, so another
    # job's row written since wins
    store.append_row(jobs / "1.jsonl", {**row, "key": "b", "finished": "2026-01-02", "v": 3})
    store.append_row(jobs / "1.jsonl", {**row, "key": "b", "finished": FUTURE, "v": 4})
    store.append_row(jobs / "2.jsonl", {**row, "key": "b", "finished": "2026-01-03", "v": 5})
    # across files, the later time wins, as before
    store.append_row(jobs / "2.jsonl", {**row, "key": "c", "finished": "2026-01-09", "v": 6})
    store.append_row(tmp_path / store.ROWS, {**row, "key": "c", "finished": "2026-01-08", "v": 7})
    with pytest.warns(UserWarning, match="1.jsonl: 1 row"):
        latest = store.latest_by_key(store.read_rows(tmp_path))
    assert {k: r["v"] for k, r in latest.items()} == {"a": 2, "b": 5, "c": 6}


# -- item 14: a local job's task ends with its controller ---------------------------------------

BLOCKING = textwrap.dedent('''
    import time
    from pathlib import Path
    from bench.registry import register_estimator
    from estimators.full import Full

    @register_estimator
    class Blocking(Full):
        """full that waits while a file exists."""
        name = "test-blocking-controller"

        def estimate(self, problem, rng):
            while Path(BLOCK).exists():
                time.sleep(0.05)
            return super().estimate(problem, rng)
''')


def _alive(pid: int) -> bool:
    return launch._process_start(pid) is not None


def test_killing_a_local_jobs_controller_ends_its_task(tmp_path, capsys):
    pytest.importorskip("submitit")
    block = tmp_path / "block"
    block.touch()
    plugin = tmp_path / "blocking.py"
    plugin.write_text(f"BLOCK = {str(block)!r}\n" + BLOCKING)
    out = tmp_path / "run"
    task = []

    def kill_the_controller_mid_cell() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            claims, jobs = launch.claims(out), launch.submitted(out)
            if claims and jobs:
                task.append(claims[0]["pid"])
                os.kill(jobs[0]["pid"], signal.SIGKILL)  # the controller (the job id) only, not its task
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_controller_mid_cell)
    killer.start()
    try:
        assert (
            main(
                [
                    "run",
                    "--include",
                    str(plugin),
                    "--tasks",
                    TOY,
                    "--estimators",
                    "test-blocking-controller",
                    "--targets",
                    "latent",
                    "--steps",
                    "2",
                    *QUICK,
                    "--out",
                    str(out),
                    "--launcher",
                    "submitit-local",
                ]
            )
            == 0
        )
        killer.join()
        assert task, "the job's task never claimed its cell"
        assert "1 cell(s) got no row" in capsys.readouterr().err
        deadline = time.monotonic() + 10
        while _alive(task[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(task[0]), "the task outlived its controller"
        block.unlink()  # a task that survived would write its row now
        time.sleep(1.0)
        assert store.read_rows(out) == []
    finally:
        block.unlink(missing_ok=True)
        killer.join()
        if task and _alive(task[0]):
            os.kill(task[0], signal.SIGKILL)
    assert main(["status", str(out)]) == 0
    assert "1 pending" in capsys.readouterr().out


def test_a_task_whose_controller_is_already_gone_stops_at_once(tmp_path):
    """The check after the kernel is asked: the parent the task expects is not its parent."""
    script = textwrap.dedent(f"""
        import os
        os.environ.update(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="1", SUBMITIT_LOCAL_WITH_SHELL="")
        from bench.run.launch import die_with_controller
        die_with_controller()
        open({str(tmp_path / "ran")!r}, "w").close()
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == -signal.SIGKILL and "controller (pid 1) has ended" in result.stdout
    assert not (tmp_path / "ran").exists()
