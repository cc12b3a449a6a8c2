"""A cell predicted not to fit the memory limit is a skip row with the prediction as its reason,
run again when the sweep is resumed; the prediction agrees with the measured peak."""

import pytest

from bench.cli import main
from bench.results import store
from bench.run.runner import SweepSpec, run_sweep

MIB = 2**20


def test_a_cell_predicted_not_to_fit_is_a_skip_row_and_runs_again_on_resume(tmp_path):
    out = tmp_path / "run"
    # digits at N = 10: full keeps ten calls' graphs (about 120 MiB), sdo one (about 13 MiB)
    spec = SweepSpec(
        tasks=["digits"],
        estimators=["full", "sdo"],
        targets=["latent"],
        steps=[10],
        iters=0,
        rounds=1,
        memory="off",
        memory_limit="60MiB",
    )
    rows = {r["estimator"]: r for r in run_sweep(spec, out)}
    full, sdo = rows["full"], rows["sdo"]
    assert full["status"] == "skipped" and full["reason"].startswith("predicted not to fit"), full
    assert "over 60.0 MiB (--memory-limit)" in full["reason"] and "N·A" in full["reason"], full["reason"]
    assert full["mem_fit_pred_bytes"] > 60 * MIB > sdo["mem_fit_pred_bytes"], (full, sdo)
    assert full["skip_kind"] == "memory-limit" and "grad_cos" not in full
    assert sdo["status"] == "ok" and sdo["mem_fit_limit_bytes"] == 60 * MIB
    # the memory is the machine's: a resumed sweep with room for it runs the cell
    resumed = {r["estimator"]: r for r in run_sweep(SweepSpec(**{**spec.__dict__, "memory_limit": "off"}), out)}
    assert resumed["full"]["status"] == "ok" and resumed["full"]["grad_cos"] > 0.999999, resumed["full"]
    assert resumed["sdo"]["key"] == sdo["key"] and resumed["sdo"]["finished"] == sdo["finished"]  # reused
    assert len(store.latest_by_key(store.read_rows(out))) == 2


@pytest.mark.slow
def test_the_planned_peak_agrees_with_the_measured_peak_on_digits(tmp_path):
    """Peak above what is resident, from each estimator's Cost and the units counted on the
    problem, against the fresh-process peak: within 5 % for full, 10 % for sdo (whose peak adds
    the working memory of its calls after the kept one)."""
    estimators = ["full", "sdo"]
    spec = SweepSpec(tasks=["digits"], estimators=estimators, targets=["latent"], steps=[10], iters=0, rounds=1)
    rows = run_sweep(spec, tmp_path / "run")
    assert {r["estimator"] for r in rows if r["status"] == "ok"} == set(estimators), rows
    for row in rows:
        ratio = row["mem_plan_bytes"] / row["peak_mem_bytes"]
        bound = 0.05 if row["estimator"] == "full" else 0.10
        assert abs(ratio - 1) <= bound, (row["estimator"], ratio)


@pytest.mark.parametrize("value", ["lots", "-1GiB", "0GB"])
def test_a_bad_memory_limit_is_one_line_and_exit_2(value, capsys):
    assert main(["run", f"--memory-limit={value}", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--memory-limit" in err and "24GiB" in err, err
