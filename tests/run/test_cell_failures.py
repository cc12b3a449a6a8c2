"""Failures inside a cell are rows: sys.exit, an interrupt that is not the user's, memory errors
and CPU allocation failures; Ctrl-C during the memory measurement prints no traceback."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.results import store
from bench.registry import include
from bench.run.runner import SweepSpec, run_sweep


ROOT = Path(__file__).resolve().parents[2]
TOY = "toy[d=2,batch=2]"


def _plugin(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


FAILING = """
    import sys
    import torch
    from bench.api import Option, register_estimator
    from estimators.full import Full

    @register_estimator
    class Failing(Full):
        name = "test-failing"
        options = (Option("how", str, "exit", "how to fail", choices=("exit", "interrupt", "memory", "alloc")),)

        def estimate(self, problem, rng):
            if self.how == "exit":
                sys.exit(3)
            if self.how == "interrupt":
                raise KeyboardInterrupt  # not the user's Ctrl-C: no SIGINT was sent
            if self.how == "memory":
                raise MemoryError("no room")
            torch.empty(2 ** 62, dtype=torch.uint8)  # the CPU allocator refuses
"""


def test_exits_interrupts_and_cpu_allocation_failures_are_rows(tmp_path):
    include(_plugin(tmp_path, "failing", FAILING))
    spec = SweepSpec(
        tasks=[TOY],
        targets=["cond"],
        steps=[2],
        iters=1,
        rounds=1,
        memory="off",
        estimators=[
            "test-failing[how=exit]",
            "test-failing[how=interrupt]",
            "test-failing[how=memory]",
            "test-failing[how=alloc]",
            "full",
        ],
    )
    rows = {row["estimator"]: row for row in run_sweep(spec, tmp_path / "run")}
    assert rows["test-failing"]["status"] == "error" and rows["test-failing"]["error_type"] == "SystemExit"
    assert rows["test-failing[how=interrupt]"]["status"] == "error"
    assert rows["test-failing[how=interrupt]"]["error_type"] == "KeyboardInterrupt"
    assert rows["test-failing[how=memory]"]["status"] == "oom"
    assert rows["test-failing[how=alloc]"]["status"] == "oom", rows["test-failing[how=alloc]"]
    assert rows["full"]["status"] == "ok"  # the sweep went on


# -- 12: Ctrl-C during the memory measurement -----------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_the_memory_measurement_prints_no_traceback(tmp_path):
    plugin = _plugin(
        tmp_path,
        "slow_in_worker",
        """
        import os, time
        from bench.api import register_estimator
        from estimators.full import Full
        @register_estimator
        class SlowInWorker(Full):
            name = "test-slow-worker"
            def estimate(self, problem, rng):
                if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
                    time.sleep(0.2)
                return super().estimate(problem, rng)
    """,
    )
    out = tmp_path / "run"
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
        "full,test-slow-worker",
        "--targets",
        "latent,cond,weights",
        "--steps",
        "2,3",
        "--iters",
        "1",
        "--rounds",
        "1",
        "--memory",
        "process",
        "--no-progress",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group, as a terminal's job
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(store.read_rows(out)) < 2:
        time.sleep(0.05)
    time.sleep(0.3)  # inside a measurement of test-slow-worker, most likely
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
