"""Sweeps as data (--config), the job launchers (submitit's local executor; SLURM refused or faked),
per-job rows files merged on read, and `bench status`."""

import json
import os
import signal
import stat
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from bench.results import store

from bench.run import launch
from bench.cli import build_parser, main, sweep_of
from bench.results.figures import FIGURES, load_spec
from bench.run.identity import cell_key
from bench.run.runner import SweepSpec, plan, run_sweep
from bench.run.sweepfile import build

ROOT = Path(__file__).resolve().parents[2]
TOY = "toy[d=16,batch=4]"
QUICK = ["--iters", "1", "--rounds", "1", "--warmup", "0", "--no-memory", "--no-progress"]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps status lines at the terminal's width


def _sweep(argv):
    return sweep_of(build_parser().parse_args(["run", *argv]))


def _one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


# -- sweeps as data -------------------------------------------------------------------------


def test_the_cli_defaults_are_sweepspecs():
    sweep = _sweep([])
    assert sweep.parts == [SweepSpec()] and sweep.launch == launch.LaunchSpec()


def test_a_sweep_file_with_parts_and_flags_that_override_it(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text(
        textwrap.dedent(f"""
        out = "{tmp_path / "out"}"
        tasks = "{TOY}"
        targets = ["latent", "cond"]
        timing-cap = 5
        timeout = 0
        [[part]]
        steps = [3, 4]
        estimators = ["full", "sdo"]
        [[part]]
        steps = "5"
        estimators = "checkpoint"
        seeds = [1, 2]
        [launcher]
        name = "slurm"
        cells_per_job = 2
        sbatch = {{ account = "lab" }}
    """)
    )
    sweep = _sweep(["--config", str(config), "--targets", "weights", "--cells-per-job", "3"])
    assert [p.steps for p in sweep.parts] == [[3, 4], [5]]
    assert [p.seeds for p in sweep.parts] == [[0], [1, 2]]
    assert all(
        p.targets == ["weights"] and p.tasks == [TOY] and p.timing_cap == 5.0 and p.timeout is None for p in sweep.parts
    )
    assert sweep.out == tmp_path / "out"
    assert (sweep.launch.launcher, sweep.launch.cells_per_job, sweep.launch.sbatch) == ("slurm", 3, {"account": "lab"})
    assert _sweep(["--config", str(config), "--out", str(tmp_path / "x")]).out == tmp_path / "x"


@pytest.mark.parametrize(
    "text,message",
    [
        ("stpes = [4]", "unknown key 'stpes'; did you mean 'steps'?"),
        ("steps = [4.5]", "expected a comma-separated list of integers"),
        ("iters = 'two'", "iters must be an integer"),
        ("interleave = 1", "interleave must be true or false"),
        ("[[part]]\nout = 'x'", "out belongs at the top level"),
        ("[launcher]\nname = 'pbs'", "unknown launcher 'pbs'; valid: local, submitit-local, slurm"),
        ("[launcher]\npartitoin = 'gpu'", "did you mean 'partition'?"),
        ("[launcher]\ntime_min = -3", "time_min must be an integer >= 0"),
        ("steps = [", "not valid TOML"),
        ("[launcher]\npartition = 'gpu'", "partition is an option of --launcher slurm, not local"),
        ("[launcher]\ndetach = true", "detach is an option of the job launchers"),
    ],
)
def test_a_bad_sweep_file_is_one_line(capsys, tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    _one_line_error(capsys, ["run", "--config", str(config), "--out", str(tmp_path / "r")], message)
    assert not (tmp_path / "r").exists()


def test_a_missing_sweep_file_is_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["run", "--config", str(tmp_path / "none.toml")], "no such file")


def test_every_figure_names_the_sweep_that_reproduces_its_committed_cells():
    """Each figure's sweep file writes its source folder, and its cells are the committed rows' cells:
    with the code hashes each row was computed with, the file's identities give the rows' keys."""
    for spec_path in sorted(FIGURES.glob("*.toml")):
        spec = load_spec(spec_path)
        sweep = build(ROOT / spec["sweep"], {}, {}, None)
        assert str(sweep.out) == spec["source"], spec_path
        cells = {
            (c.task.spec, c.estimator.spec, c.target, c.steps, c.seed): c for _, part in plan(sweep.parts) for c in part
        }
        rows = list(store.latest_by_key(store.read_rows(ROOT / spec["source"])).values())
        assert len(rows) == len(cells), spec_path
        for row in rows:
            cell = cells[(row["task"], row["estimator"], row["target"], row["steps"], row["seed"])]
            identity = dict(cell.identity)
            for name in ("task_code", "estimator_code", "task_data", "reference_code"):
                if name in row:
                    identity[name] = row[name]
                else:  # rows from before the weights' digest and the reference's code were in the key
                    identity.pop(name, None)
            assert cell_key(identity) == row["key"], (spec_path, row["estimator"])


# -- rows files ---------------------------------------------------------------------------


def test_a_run_folder_merges_every_jobs_rows_latest_first(tmp_path):
    row = {"status": "ok", "task": "t", "estimator": "e", "target": "latent", "steps": 1, "seed": 0}
    store.append_row(tmp_path / store.ROWS, {**row, "key": "a", "finished": "2026-01-02", "v": 1})
    store.append_row(tmp_path / store.ROWS_DIR / "7.jsonl", {**row, "key": "a", "finished": "2026-01-03", "v": 2})
    store.append_row(tmp_path / store.ROWS_DIR / "8.jsonl", {**row, "key": "a", "finished": "2026-01-01", "v": 0})
    store.append_row(tmp_path / store.ROWS_DIR / "8.jsonl", {**row, "key": "b", "v": 3})
    latest = store.latest_by_key(store.read_rows(tmp_path))
    assert latest["a"]["v"] == 2 and latest["b"]["v"] == 3 and latest["b"]["finished"] > "2026"


# -- launchers ----------------------------------------------------------------------------


def _figures(rows):
    fields = (
        "status",
        "estimator",
        "target",
        "steps",
        "seed",
        "grad_cos",
        "grad_rel_err",
        "nfe_forward",
        "nfe_vjp",
        "reward_final",
    )
    return {row["key"]: tuple(row.get(f) for f in fields) for row in rows}


def test_submitit_local_jobs_write_the_rows_a_local_run_writes(tmp_path, capsys):
    argv = [
        "run",
        "--tasks",
        TOY,
        "--estimators",
        "full,sdo,checkpoint",
        "--targets",
        "cond",
        "--steps",
        "3,4,5",
        *QUICK,
    ]
    assert main(argv + ["--out", str(tmp_path / "local")]) == 0
    jobs_out = tmp_path / "jobs"
    assert main(argv + ["--out", str(jobs_out), "--launcher", "submitit-local", "--array-parallelism", "3"]) == 0
    local = _figures(store.read_rows(tmp_path / "local"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn or unusable line anywhere
        jobs = store.read_rows(jobs_out)
    assert not (jobs_out / store.ROWS).exists()
    assert len(list((jobs_out / store.ROWS_DIR).glob("*.jsonl"))) == 3  # one job per point
    assert len(jobs) == 9 and _figures(jobs) == local
    assert {row["job"] for row in jobs} == {r["job"] for r in launch.submitted(jobs_out)}
    # resume across launchers: the local launcher finds every cell done by the jobs
    assert main(argv + ["--out", str(jobs_out)]) == 0
    assert "9 of 9 cells already have rows" in capsys.readouterr().err
    assert not (jobs_out / store.ROWS).exists()


BLOCKING = textwrap.dedent('''
    import time
    from pathlib import Path
    from bench.registry import register_estimator
    from estimators.full import Full

    @register_estimator
    class Blocking(Full):
        """full that waits while a file exists."""
        name = "test-blocking"

        def estimate(self, problem, rng):
            while Path(BLOCK).exists():
                time.sleep(0.05)
            return super().estimate(problem, rng)
''')


def test_a_killed_job_leaves_only_its_cell_to_rerun(tmp_path, capsys):
    block = tmp_path / "block"
    block.touch()
    plugin = tmp_path / "blocking.py"
    plugin.write_text(f"BLOCK = {str(block)!r}\n" + BLOCKING)
    out = tmp_path / "run"
    argv = [
        "run",
        "--include",
        str(plugin),
        "--tasks",
        TOY,
        "--estimators",
        "full,sdo,test-blocking",
        "--targets",
        "latent",
        "--steps",
        "3",
        *QUICK,
        "--out",
        str(out),
        "--launcher",
        "submitit-local",
        "--cells-per-job",
        "1",
        "--array-parallelism",
        "3",
    ]
    assert main(argv + ["--detach"]) == 0
    assert "detached" in capsys.readouterr().err
    deadline = time.monotonic() + 240
    victim = None
    while victim is None and time.monotonic() < deadline:  # the blocking cell's job, mid-cell
        for claim in launch.claims(out):
            if len(claim["cells"]) == 1 and not claim["stale"]:
                row_keys = {r["key"] for r in store.read_rows(out)}
                if claim["cells"][0] not in row_keys and _is_blocking_cell(out, claim["cells"][0]):
                    victim = claim
        time.sleep(0.2)
    assert victim is not None, "the blocking job never started"
    os.kill(victim["pid"], signal.SIGKILL)  # as a scheduler's time limit or a node failure would
    while time.monotonic() < deadline and any(launch.job_state(out, j) == "ALIVE" for j in launch.submitted(out)):
        time.sleep(0.2)
    report = main(["status", str(out)])
    assert report == 0
    text = capsys.readouterr().out
    assert "2 done" in text and "1 pending" in text and "interrupted" in text
    killed = victim["cells"][0]
    first_jobs = {j["job"] for j in launch.submitted(out)}
    block.unlink()
    assert main([a for a in argv if a != "--detach"]) == 0
    again = [j for j in launch.submitted(out) if j["job"] not in first_jobs]
    assert [j["cells"] for j in again] == [[killed]]  # only the killed cell was submitted again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = store.read_rows(out)
    assert sorted(r["key"] for r in rows) == sorted({r["key"] for r in rows})  # no duplicate row
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert main(["status", str(out)]) == 0
    assert "3 done" in capsys.readouterr().out


def _is_blocking_cell(out, key):
    cells = json.loads((out / store.RUN).read_text())["cells"]
    return any(c["key"] == key and c["estimator"] == "test-blocking" for c in cells)


def test_slurm_without_slurm_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither sbatch nor srun
    _one_line_error(
        capsys,
        ["run", "--tasks", TOY, "--steps", "3", "--launcher", "slurm", "--out", str(tmp_path / "r")],
        "--launcher slurm needs SLURM, but sbatch and srun is not on this machine's PATH; use "
        "--launcher local, or --launcher submitit-local",
    )
    assert not (tmp_path / "r" / store.RUN).exists()


def test_slurm_submits_one_array_with_the_options(tmp_path, capsys, monkeypatch):
    """A stand-in sbatch records the script submitit writes; nothing runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch.txt"
    for name, body in (
        ("sbatch", f'for last; do :; done\ncat "$last" >> {record}\necho "Submitted batch job 4242"'),
        ("srun", "exit 0"),
        ("sacct", "exit 1"),
        ("scancel", "exit 0"),
    ):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--tasks",
                TOY,
                "--estimators",
                "full,sdo",
                "--targets",
                "latent,cond",
                "--steps",
                "3",
                "--no-progress",
                "--out",
                str(out),
                "--launcher",
                "slurm",
                "--partition",
                "gpu",
                "--time-min",
                "30",
                "--gpus-per-job",
                "1",
                "--cpus-per-job",
                "4",
                "--array-parallelism",
                "2",
                "--sbatch",
                "account=lab",
                "--sbatch",
                "qos=high",
                "--detach",
            ]
        )
        == 0
    )
    script = record.read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=30",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --array=0-1%2",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
    ):
        assert line in script, script
    jobs = launch.submitted(out)
    assert [j["job"] for j in jobs] == ["4242_0", "4242_1"] and [len(j["cells"]) for j in jobs] == [2, 2]
    assert main(["status", str(out)]) == 0
    assert "4 pending" in capsys.readouterr().out


def test_status_of_a_local_run_and_of_no_run(tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "--tasks",
                TOY,
                "--estimators",
                "full,truncated[k=2]",
                "--targets",
                "latent",
                "--steps",
                "3",
                *QUICK,
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["status", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "2 cells of the latest sweep" in out and "2 done, 0 failed, 0 running, 0 queued, 0 pending" in out
    _one_line_error(capsys, ["status", str(tmp_path)], "is not a run folder")


def test_local_jobs_get_gpus_of_their_own(monkeypatch, tmp_path):
    """Without a GPU here: a stand-in executor records what each job was given."""
    import torch

    class Job:
        def __init__(self):
            self.job_id, self.finished = str(os.getpid()), False

        def done(self):
            return self.finished

    given, jobs = [], []

    class Executor:
        def update_parameters(self, **kw):
            given.append(kw["visible_gpus"])

        def submit(self, *args):
            jobs.append(Job())
            if len(jobs) == 2:
                jobs[0].finished = True  # the first job ends once the second is submitted
            return jobs[-1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")

    class Cell:
        key, point = "k", ("p",)

    spec = launch.LaunchSpec(launcher="submitit-local", gpus_per_job=2, cells_per_job=1)
    launch.submit_jobs(Executor(), [(SweepSpec(), [Cell(), Cell(), Cell()])], tmp_path, spec, threads=1, force=False)
    assert given == [[4, 5], [6, 7], [4, 5]]


def test_every_reference_sweep_file_reads():
    for path in sorted((ROOT / "results" / "reference" / "sweeps").glob("*.toml")):
        sweep = build(path, {}, {}, None)
        assert sweep.out is not None and sweep.parts, path


def test_a_local_run_leaves_the_cells_a_live_job_holds_to_it(tmp_path):
    """Issue 21, item 11: a local run on a folder whose cells a live job holds ran them again (8
    rows for 4 keys). A fresh claim of a live process keeps them out of the local run, --force too."""
    spec = SweepSpec(
        tasks=["toy[d=2,batch=2]"],
        estimators=["full", "sdo"],
        targets=["latent"],
        steps=[2],
        iters=0,
        rounds=1,
        memory="off",
    )
    keys = [c.key for _, cells in plan([spec]) for c in cells]
    out = tmp_path / "out"
    out.mkdir()
    claim = launch.Claim(out, "4242")
    claim.hold(keys[:1])  # this process is alive: the claim is fresh
    try:
        with pytest.warns(UserWarning, match="1 cell\\(s\\) are held by live job\\(s\\) 4242"):
            rows = run_sweep(spec, out, force=True)
        assert [r["key"] for r in store.read_rows(out)] == keys[1:]
        assert [r["key"] for r in rows] == keys[1:]
    finally:
        claim.release()
    run_sweep(spec, out)  # released: the cell runs now
    assert sorted(r["key"] for r in store.read_rows(out)) == sorted(keys)
