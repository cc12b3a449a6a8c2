"""--isolate cell: each cell in a freshly spawned process (the default on CUDA), tested on the CPU:
the same rows as in-process, and a cell that blocks the timer signal (as a hung CUDA kernel does)
is killed by its parent and recorded as a timeout."""

import textwrap

import pytest

from bench.results import store

from bench.run import isolate
from bench.run.runner import SweepSpec, run_sweep

TOY = "toy[d=2,batch=2]"


def test_isolated_cells_give_the_same_rows(tmp_path):
    common = dict(
        tasks=[TOY],
        estimators=["full", "truncated[k=2]"],
        targets=["latent"],
        steps=[3],
        iters=2,
        rounds=1,
        memory="off",
    )
    here = {r["key"]: r for r in run_sweep(SweepSpec(**common, isolate="none"), tmp_path / "here")}
    apart = {r["key"]: r for r in run_sweep(SweepSpec(**common, isolate="cell"), tmp_path / "apart")}
    assert here.keys() == apart.keys() and len(here) == 2
    assert {r["status"] for r in apart.values()} == {"ok", "skipped"}
    for key, row in here.items():
        other = apart[key]
        assert row["status"] == other["status"], (row, other)
        for field in ("grad_cos", "grad_rel_err", "nfe_forward", "nfe_vjp", "reward_curve", "reason"):
            assert row.get(field) == other.get(field), field
    assert len(store.read_rows(tmp_path / "apart")) == 2


@pytest.mark.slow
def test_a_cell_that_ignores_its_timer_is_killed_by_its_parent(tmp_path, monkeypatch):
    plugin = tmp_path / "hung.py"
    plugin.write_text(
        textwrap.dedent('''
        import signal, time
        from bench.api import register_estimator
        from estimators.full import Full

        @register_estimator
        class Hung(Full):
            """Blocks SIGALRM, like a call stuck in a CUDA kernel that never returns to Python."""
            name = "test-hung"

            def estimate(self, problem, rng):
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(600)
    ''')
    )
    monkeypatch.setattr(isolate, "GRACE_S", 2.0)
    spec = SweepSpec(
        tasks=[TOY],
        estimators=["test-hung", "full"],
        targets=["cond"],
        steps=[2],
        iters=1,
        rounds=1,
        memory="off",
        timeout=6,
        isolate="cell",
        includes=[str(plugin)],
    )
    rows = {r["estimator"]: r for r in run_sweep(spec, tmp_path / "run")}
    assert rows["test-hung"]["status"] == "timeout" and "killed" in rows["test-hung"]["error"]
    assert rows["full"]["status"] == "ok"
