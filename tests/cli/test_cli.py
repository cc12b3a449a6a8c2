"""The command line and the sweep harness: bad input is one line, cells are rows, reruns resume."""

import json
import subprocess
import sys
import textwrap

import pytest

from bench.results import store
from bench.cli import main

TOY = "toy[d=128,batch=32]"
SMALL = ["--tasks", TOY, "--steps", "4,6", "--iters", "2", "--rounds", "2", "--warmup", "0", "--no-progress"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "--estimators", "ful"], "unknown estimator 'ful'; did you mean 'full'?"),
        (["run", "--estimators", "truncated[j=1]"], "unknown option 'j'"),
        (["run", "--estimators", "truncated[k=0]"], "must be >= 1"),
        (["run", "--estimators", "truncated[k=30]", "--steps", "10,20"], "exceeds the step count N=10"),
        (["run", "--tasks", TOY, "--steps", "-5"], "step count must be a positive integer, got -5"),
        (["run", "--steps", "ten"], "comma-separated list of integers"),
        (["run", "--targets", "noize"], "unknown target 'noize' for task digits; valid: latent, cond, weights, noise"),
        (["run", "--targets", "noise"], "target 'noise' needs a stochastic sampler: set eta > 0, e.g. digits[eta=1.0]"),
        (["run", "--tasks", "toy[d=0]"], "must be >= 1"),
        (["run", "--tasks", "tyo"], "did you mean 'toy'?"),
        (["run", "--device", "tpu"], "unknown device 'tpu'"),
        (["run", "--include", "nowhere.py"], "no such Python file"),
        (["frobnicate"], "unknown command 'frobnicate'; valid: list, run"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    code = main(argv + ["--out", str(tmp_path / "r")] if argv[0] == "run" else argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "r" / "rows.jsonl").exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--estimators", "truncated[k=0]", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: truncated: option k='0' must be >= 1"


def test_list_shows_estimators_options_tasks_and_targets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal's width
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for text in (
        "full",
        "checkpoint",
        "adjoint",
        "sdo",
        "truncated",
        "k: int = 1",
        "draft-lv",
        "dno",
        "edict",
        "zeroth-order",
        "score-function",
        "torchdiffeq-adjoint",
        "noise",
        "recover: backward|cache = backward",
        "toy",
        "latent",
        "cond",
        "weights",
    ):
        assert text in out


def _rows(path):
    return [json.loads(line) for line in (path / "rows.jsonl").read_text().splitlines()]


def test_run_writes_rows_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "run",
        "--estimators",
        "full,sdo,truncated[k=2]",
        "--targets",
        "latent,weights",
        "--out",
        str(out),
        "--no-memory",
        *SMALL,
    ]
    assert main(argv) == 0
    rows = _rows(out)
    assert len(rows) == 3 * 2 * 2
    by = {(r["estimator"], r["target"], r["steps"]): r for r in rows}
    full = by[("full", "latent", 6)]
    for field in (
        "schema",
        "key",
        "status",
        "task",
        "estimator",
        "options",
        "target",
        "steps",
        "seed",
        "grad_cos",
        "grad_rel_err",
        "time_s",
        "time_iqr_s",
        "peak_mem_bytes",
        "mem_kind",
        "nfe_forward",
        "nfe_vjp",
        "reward_init",
        "reward_final",
        "reward_curve",
    ):
        assert field in full, field
    assert full["status"] == "ok" and full["grad_cos"] == pytest.approx(1.0, abs=1e-12)
    assert full["nfe_vjp"] == 6 and full["nfe_forward_pred"] == 6
    assert len(full["reward_curve"]) == len(full["reward_curve_s"]) == 3  # iterates 0..iters
    assert full["reward_curve_s"][0] == 0 and full["reward_curve_s"][-1] == full["optim_seconds"] > 0
    assert by[("sdo", "weights", 4)]["nfe_vjp"] == 1
    assert by[("truncated[k=2]", "weights", 4)]["nfe_vjp"] == 2
    skipped = by[("truncated[k=2]", "latent", 4)]
    assert skipped["status"] == "skipped" and "latent_path" in skipped["reason"]
    assert "grad_cos" not in skipped  # a skip is not a silent zero
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["estimators"] == ["full", "sdo", "truncated[k=2]"]
    assert run["torch"] and "git_commit" in run and run["device"] == "cpu"

    assert main(argv) == 0  # the same command again: nothing reruns
    assert len(_rows(out)) == 12
    assert "12 of 12 cells already" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
    assert len(_rows(out)) == 24
    assert len(store.latest_by_key(store.read_rows(out))) == 12


BROKEN = textwrap.dedent("""
    import torch
    from bench.registry import register_estimator
    from estimators.base import Cost, Estimator

    @register_estimator
    class Crashes(Estimator):
        name = "test-crashes"
        def cost(self, steps, target):
            return Cost(steps, 0, "-")
        def estimate(self, problem, rng):
            raise RuntimeError("deliberate failure")

    @register_estimator
    class Explodes(Estimator):
        name = "test-nan"
        def cost(self, steps, target):
            return Cost(steps, 0, "-")
        def estimate(self, problem, rng):
            from estimators.base import backprop
            x0 = problem.chain.sample(problem.x_start, problem.cond)
            for leaf in problem.leaves:
                leaf.grad = torch.full_like(leaf, float("nan"))
            loss, rewards = problem.loss(x0)
            from estimators.base import Estimate
            return Estimate(float(loss), rewards, x0)
""")


def test_failing_cells_are_rows_and_the_sweep_goes_on(tmp_path):
    plugin = tmp_path / "broken_estimators.py"
    plugin.write_text(BROKEN)
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--include",
            str(plugin),
            "--estimators",
            "test-crashes,test-nan,full",
            "--targets",
            "cond",
            "--out",
            str(out),
            "--no-memory",
            *SMALL,
        ]
    )
    assert code == 0
    statuses = {(r["estimator"], r["steps"]): r for r in _rows(out)}
    crash = statuses[("test-crashes", 4)]
    assert crash["status"] == "error" and crash["error"] == "deliberate failure"
    assert crash["error_type"] == "RuntimeError"
    assert statuses[("test-nan", 6)]["status"] == "diverged"
    assert statuses[("full", 6)]["status"] == "ok"


def test_torn_last_line_is_dropped_and_resume_completes(tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--estimators", "full,sdo", "--targets", "cond", "--out", str(out), "--no-memory", *SMALL]
    assert main(argv) == 0
    lines = (out / "rows.jsonl").read_text().splitlines()
    (out / "rows.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # killed mid-write
    with pytest.warns(UserWarning, match="torn"):
        assert len(store.read_rows(out)) == 2
    assert main(argv) == 0
    rows = _rows(out)  # every line parses again
    assert len(rows) == 4 and len(store.latest_by_key(rows)) == 4


def test_memory_in_a_worker_follows_the_cost_model(tmp_path):
    """From N = 10 to 100: full grows by N*A (at least 5x), checkpoint by N*S, the adjoint (state
    recovery) and sdo change by less than 25 %; every row carries the model's prediction."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--tasks",
                "toy[d=256,batch=32]",
                "--estimators",
                "full,checkpoint,adjoint,sdo",
                "--targets",
                "cond",
                "--steps",
                "10,100",
                "--iters",
                "1",
                "--rounds",
                "1",
                "--warmup",
                "0",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _rows(out)
    assert all(r["mem_kind"] == "rss_peak" for r in rows)
    peak = {(r["estimator"], r["steps"]): r["peak_mem_bytes"] for r in rows}
    latent = 32 * 256 * 8  # S: one float64 latent
    assert peak[("full", 100)] >= 5 * peak[("full", 10)]
    growth = {name: peak[(name, 100)] - peak[(name, 10)] for name in ("full", "checkpoint", "adjoint", "sdo")}
    assert growth["full"] > 90 * 6 * latent  # the toy keeps about 8 latent-sized tensors per step
    assert 0.9 * 90 * latent < growth["checkpoint"] < 1.5 * 90 * latent
    for flat in ("adjoint", "sdo"):
        assert abs(growth[flat]) < 0.25 * peak[(flat, 10)], (flat, growth[flat])
    for row in rows:
        assert row["mem_unit_s_bytes"] == latent and row["mem_unit_a_bytes"] > latent
        assert 0.2 < row["peak_mem_bytes"] / row["mem_pred_bytes"] < 5, row["estimator"]
