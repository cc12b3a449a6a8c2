"""Timing: contention seen and never averaged in, rounds until stable, paired ratios with
intervals, interleaved sweeps, the time model's units and the phases of a cell."""

import json
import statistics
import subprocess
import sys
import time

import pytest
import torch

from bench.run.runner import SweepSpec, run_sweep
from bench.measure.timing import LoadProbe, Rounds, denoiser_units, paired_ratio, time_interleaved, usable_cpus

CPU = torch.device("cpu")
needs_proc = pytest.mark.skipif(not LoadProbe().supported, reason="contention is read from Linux /proc/stat")


def _busy(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


@needs_proc
def test_the_probe_sees_another_process_keep_a_core_busy():
    probe = LoadProbe()
    busy = _busy(1)
    try:
        time.sleep(0.3)  # let it start
        before = probe.snapshot()
        time.sleep(1.0)
        loaded = probe.others(before, probe.snapshot())
    finally:
        _stop(busy)
    assert 0.7 < loaded < 1.6


def _matmuls(seconds: float):
    """A torch workload of about `seconds` on this machine, with the sweep's threads."""
    a = torch.randn(256, 256)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.05:
        a @ a
        n += 1
    reps = max(1, int(n * seconds / 0.05))

    def work():
        for _ in range(reps):
            a @ a

    return work


@needs_proc
@pytest.mark.slow
def test_a_timing_beside_other_load_is_flagged_or_stays_right():
    """Every core loaded by other processes: the figure is flagged (slowed rounds left out,
    `timing_suspect` said) or within 10 % of the quiet figure; never an unflagged 4x error."""
    threads = usable_cpus()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        work = _matmuls(0.25)
        quiet = time_interleaved({"work": work}, CPU, rounds=3, threads=threads, warmup=1)["work"]
        busy = _busy(usable_cpus())
        try:
            time.sleep(0.3)
            loaded = time_interleaved({"work": work}, CPU, rounds=2, threads=threads, warmup=0)["work"]
        finally:
            _stop(busy)
    finally:
        torch.set_num_threads(previous)
    ratio = loaded.summary()["time_s"] / quiet.summary()["time_s"]
    assert loaded.suspect or abs(ratio - 1) < 0.10, (ratio, loaded)
    assert loaded.suspect or sum(loaded.slowed) == 0
    if loaded.suspect:
        assert "busy elsewhere" in loaded.suspect or "other processes" in loaded.suspect


def test_rounds_stop_when_stable_or_at_the_cap():
    steady = time_interleaved({"steady": lambda: time.sleep(0.01)}, CPU, rounds=3, threads=1, stable=0.3)
    assert steady["steady"].stop.startswith("stable") and len(steady["steady"].seconds) >= 3
    flip = iter(range(10**6))
    noisy = time_interleaved(
        {"noisy": lambda: time.sleep(0.002 if next(flip) % 2 else 0.03)},
        CPU,
        rounds=3,
        threads=1,
        stable=0.05,
        cap_s=0.6,
    )
    assert noisy["noisy"].stop == "cap" and noisy["noisy"].spread() > 0.05
    fixed = time_interleaved({"fixed": lambda: None}, CPU, rounds=4, threads=1)
    assert fixed["fixed"].stop == "rounds" and len(fixed["fixed"].seconds) == 4


def test_round_robin_rotates_and_a_failing_call_leaves_the_rotation():
    order = []

    def call(name):
        def run():
            order.append(name)
            if name == "bad" and order.count("bad") == 2:
                raise RuntimeError("boom")

        return run

    results = time_interleaved({n: call(n) for n in ("a", "b", "bad")}, CPU, rounds=3, threads=1)
    assert order[:3] == ["a", "b", "bad"] and order[3:6] == ["b", "bad", "a"]  # pass 2 starts one later
    assert isinstance(results["bad"].error, RuntimeError) and len(results["bad"].seconds) == 1
    assert len(results["a"].seconds) == 3 and results["a"].error is None

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        time_interleaved({"x": interrupted}, CPU, rounds=1, threads=1)
    kept = time_interleaved({"x": interrupted}, CPU, rounds=1, threads=1, fatal=lambda exc: False)
    assert isinstance(kept["x"].error, KeyboardInterrupt)


def test_paired_ratio_cancels_shared_slowdowns_and_brackets_the_truth():
    load = [1.0, 3.0, 1.2, 5.0, 1.1, 2.0, 1.0, 4.0]  # the machine's speed, pass by pass
    base = Rounds(seconds=[x for x in load], passes=list(range(8)), slowed=[False] * 8)
    half = Rounds(seconds=[0.5 * x for x in load], passes=list(range(8)), slowed=[False] * 8)
    paired = paired_ratio(half, base)
    assert (
        paired["ratio"] == pytest.approx(0.5)
        and paired["lo"] == pytest.approx(0.5)
        and paired["hi"] == pytest.approx(0.5)
    )
    jitter = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98]
    noisy = Rounds(seconds=[0.5 * x * j for x, j in zip(load, jitter)], passes=list(range(8)), slowed=[False] * 8)
    paired = paired_ratio(noisy, base)
    assert paired["lo"] <= 0.5 <= paired["hi"] and paired["hi"] - paired["lo"] < 0.2
    slowed = Rounds(seconds=[0.5] * 8, passes=list(range(8)), slowed=[True] * 4 + [False] * 4)
    assert paired_ratio(slowed, base)["pairs"] == 4  # slowed rounds never enter a ratio
    assert paired_ratio(Rounds(), base) is None


def test_denoiser_units_leave_the_counts_alone():
    from bench.registry import TASKS

    task = TASKS.create("toy[d=2,batch=2]")
    task.setup(CPU)
    problem = task.make_problem("cond", 5, 0)
    units = denoiser_units(problem, CPU, rounds=3)
    assert units["F"] > 0 and units["V"] >= 0
    assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (0, 0)
    assert problem.leaves[0].grad is None


def _rows(folder):
    return [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]


def test_an_interleaved_sweep_pairs_every_estimator_with_full_and_accounts_for_its_time(tmp_path):
    spec = SweepSpec(
        tasks=["toy[d=2,batch=2]"],
        estimators=["full", "sdo", "checkpoint"],
        targets=["cond"],
        steps=[4],
        iters=1,
        rounds=3,
        memory="off",
    )
    run_sweep(spec, tmp_path)
    rows = {r["estimator"]: r for r in _rows(tmp_path)}
    assert all(r["time_paired"] and r["time_baseline"] == "full" for r in rows.values())
    assert rows["full"]["time_vs_baseline"] == 1.0
    for name in ("sdo", "checkpoint"):
        r = rows[name]
        assert r["time_vs_baseline_lo"] <= r["time_vs_baseline"] <= r["time_vs_baseline_hi"]
        assert len(r["time_rounds_s"]) >= 3 and r["time_min_s"] <= r["time_s"]
        assert r["time_pred_s"] == pytest.approx(
            r["nfe_forward_pred"] * r["time_unit_f_s"]
            + r["nfe_vjp_pred"] * r["time_unit_v_s"]
            + r["time_pred_checkpointed"] * r["time_unit_h_s"]
        )
    assert rows["checkpoint"]["time_pred_checkpointed"] == 8 and rows["sdo"]["time_pred_checkpointed"] == 0
    for r in rows.values():
        assert set(r["phase_s"]) >= {"setup", "agreement", "reference", "units", "timing", "optimise", "evaluate"}
        assert sum(r["phase_s"].values()) == pytest.approx(r["cell_seconds"], abs=0.02)
        assert r["threads"] == 1
    # A resumed sweep with a new estimator times it beside the (already recorded) baseline.
    spec.estimators.append("truncated[k=2]")
    run_sweep(spec, tmp_path)
    rows = _rows(tmp_path)
    assert len(rows) == 4 and rows[-1]["estimator"] == "truncated[k=2]"
    assert rows[-1]["time_vs_baseline"] > 0 and rows[-1]["time_paired"]


def test_without_interleaving_no_pairs_are_claimed(tmp_path):
    spec = SweepSpec(
        tasks=["toy[d=2,batch=2]"],
        estimators=["full", "sdo"],
        targets=["cond"],
        steps=[4],
        iters=1,
        rounds=2,
        memory="off",
        interleave=False,
        threads=1,
    )
    run_sweep(spec, tmp_path)
    rows = _rows(tmp_path)
    assert not any(r["time_paired"] for r in rows) and not any("time_vs_baseline" in r for r in rows[1:])


def test_a_timeout_spans_the_phases_of_a_cell(tmp_path):
    """The limit holds over the agreement call, the rounds and the rest, not per phase."""
    spec = SweepSpec(
        tasks=["toy[d=2,batch=2]"],
        estimators=["full"],
        targets=["cond"],
        steps=[4],
        iters=10**6,
        rounds=2,
        memory="off",
        timeout=1.5,
    )
    started = time.perf_counter()
    run_sweep(spec, tmp_path)
    (row,) = _rows(tmp_path)
    assert row["status"] == "timeout" and time.perf_counter() - started < 30
    assert statistics.fsum(row["phase_s"].values()) == pytest.approx(1.5, abs=0.5)


def test_suspect_rows_are_marked_in_the_summary_and_the_report(tmp_path):
    from rich.console import Console

    from bench.results.report import write_report
    from bench.results.summary import print_summary

    spec = SweepSpec(
        tasks=["toy[d=2,batch=2]"],
        estimators=["full", "sdo"],
        targets=["cond"],
        steps=[4],
        iters=1,
        rounds=2,
        memory="off",
    )
    rows = run_sweep(spec, tmp_path / "run")
    rows[1]["timing_suspect"] = "only 0 of 2 rounds ran without other load (up to 1.9 cores busy elsewhere, 0 free)"
    (tmp_path / "run" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    console = Console(record=True, width=120)
    print_summary(rows, console)
    text = console.export_text()
    assert "!" in text and "timing suspect" in text and "1 with suspect timing" in text
    page = (write_report(tmp_path / "run", tmp_path / "report") / "index.md").read_text()
    assert " !" in page and "Where the time went" in page


def test_compare_names_suspect_timings_and_shows_both_ratios(tmp_path):
    from bench.results.compare import compare

    spec = SweepSpec(
        tasks=["toy[d=2,batch=2]"],
        estimators=["full", "sdo"],
        targets=["cond"],
        steps=[4],
        iters=1,
        rounds=2,
        memory="off",
    )
    rows = run_sweep(spec, tmp_path / "a")
    (tmp_path / "b").mkdir()
    rows[1]["timing_suspect"] = "only 0 of 2 rounds ran without other load"
    (tmp_path / "b" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = compare(tmp_path / "a", tmp_path / "b").set_index("estimator")
    assert "timing suspect in B" in table.loc["sdo", "flags"] and table.loc["full", "flags"] == ""
    assert table.loc["sdo", "vs_base_a"] == table.loc["sdo", "vs_base_b"] > 0
