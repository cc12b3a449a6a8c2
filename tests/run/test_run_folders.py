"""A run folder stays one record: repeated steps, seeds and aliases run each cell once, a second
sweep on a folder in use is refused (in this process or another), run.json keeps every record,
and a bad line in rows.jsonl is skipped and named by run, report and compare."""

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from bench.results import store
from bench.cli import main
from bench.run.runner import SweepSpec, run_sweep


ROOT = Path(__file__).resolve().parents[2]
TOY = "toy[d=2,batch=2]"
FAST = ["--tasks", TOY, "--steps", "2", "--iters", "1", "--rounds", "1", "--no-memory", "--no-progress"]


def _plugin(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_repeated_steps_seeds_and_aliases_run_each_cell_once(tmp_path):
    spec = SweepSpec(
        tasks=[TOY, "toy[batch=2,d=2]"],
        estimators=["full", "bptt", "full[]"],
        targets=["cond", "cond"],
        steps=[2, 2],
        seeds=[0, 0],
        iters=1,
        rounds=1,
        memory="off",
    )
    rows = run_sweep(spec, tmp_path)
    assert len(store.read_rows(tmp_path)) == 1 and len(rows) == 1


# -- 8: concurrent sweeps on one folder -----------------------------------------------------------


def test_a_second_sweep_on_a_folder_in_use_is_refused(tmp_path, capsys):
    with store.locked(tmp_path):
        assert main(["run", *FAST, "--estimators", "full", "--targets", "cond", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another sweep is writing to" in err and f"pid {os.getpid()}" in err
    assert main(["run", *FAST, "--estimators", "full", "--targets", "cond", "--out", str(tmp_path)]) == 0


def test_a_concurrent_sweep_in_another_process_is_refused(tmp_path, capsys):
    """A real second process while the first holds the folder (a slow plug-in keeps it busy)."""
    plugin = _plugin(
        tmp_path,
        "sleepy",
        """
        import time
        from bench.api import register_estimator
        from estimators.full import Full
        @register_estimator
        class Sleepy(Full):
            name = "test-sleepy"
            def estimate(self, problem, rng):
                time.sleep(1)  # three calls: the folder stays in use for 3 s or more
                return super().estimate(problem, rng)
    """,
    )
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "bench",
        "run",
        *FAST,
        "--include",
        str(plugin),
        "--estimators",
        "test-sleepy",
        "--targets",
        "cond",
        "--out",
        str(out),
    ]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / store.LOCK).exists() and (out / store.LOCK).read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # this process, while the other one holds the folder
    second = main(["run", *FAST, "--estimators", "full", "--targets", "cond", "--out", str(out)])
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert second == 2 and "another sweep is writing to" in capsys.readouterr().err
    assert len(store.read_rows(out)) == 1


def test_run_json_keeps_every_record_and_sets_an_unreadable_one_aside(tmp_path):
    args = ["run", *FAST, "--estimators", "full", "--targets", "cond", "--out", str(tmp_path)]
    assert main(args) == 0 and main(args) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert len(record["history"]) == 1
    (tmp_path / "run.json").write_bytes(b"\xff{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    aside = list(tmp_path.glob("run.json.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"\xff{not json"
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["history"] == [{"unreadable_record_moved_to": aside[0].name}]
    assert not list(tmp_path.glob("*.tmp"))


# -- 9: bad lines ---------------------------------------------------------------------------------


def test_bad_lines_are_skipped_and_named_by_run_report_and_compare(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["run", *FAST, "--estimators", "full,sdo", "--targets", "cond", "--out", str(run_dir)]
    assert main(args) == 0
    good = (run_dir / "rows.jsonl").read_bytes()
    row = json.loads(good.splitlines()[0])
    no_estimator = {k: v for k, v in row.items() if k != "estimator"}
    bad_lines = [
        b"42",
        b"\xff\xfe not utf-8",
        json.dumps(no_estimator).encode(),
        b"[1, 2]",
        b"null",
        json.dumps({**row, "steps": "two"}).encode(),
    ]
    (run_dir / "rows.jsonl").write_bytes(good + b"\n".join(bad_lines) + b"\n")
    (run_dir / "run.json").write_text("[garbage")
    with pytest.warns(UserWarning) as caught:
        rows = store.read_rows(run_dir)
    assert len(rows) == 2
    messages = " ".join(str(w.message) for w in caught)
    for number, why in (
        (3, "not a JSON object (int)"),
        (4, "not UTF-8"),
        (5, "no str field 'estimator'"),
        (6, "not a JSON object (list)"),
        (8, "field 'steps' is not a int"),
    ):
        assert f"line {number}: {why}" in messages, messages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0  # resume: both cells reused
        assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
        assert main(["compare", str(run_dir), str(run_dir)]) == 0
    assert "2 of 2 cells already" in capsys.readouterr().err
