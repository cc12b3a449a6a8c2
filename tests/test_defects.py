"""The defects issue 9's independent checks found, each pinned: stale or duplicated results, bad
lines that stopped a user, failures that escaped a row, labels read as markup, unreproducible
figures, and the checkpoint count."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from bench import store
from bench.chain import Chain, Schedule
from bench.cli import main
from bench.identity import code_hash, code_modules
from bench.problem import Problem
from bench.registry import ESTIMATORS, include
from bench.runner import SweepSpec, expand, resolve, run_sweep

ROOT = Path(__file__).resolve().parent.parent
TOY = "toy[d=2,batch=2]"
FAST = ["--tasks", TOY, "--steps", "2", "--iters", "1", "--rounds", "1", "--no-memory", "--no-progress"]


def _plugin(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


# -- 5, 6: the code hash --------------------------------------------------------------------------

HASH_OF = textwrap.dedent("""
    import sys
    from bench.identity import code_hash
    from bench.registry import ESTIMATORS, include
    for path in sys.argv[2:]:
        include(path)
    print(code_hash(ESTIMATORS.get(sys.argv[1])))
""")


def test_the_code_hash_of_an_included_file_does_not_depend_on_include_order(tmp_path):
    a = _plugin(
        tmp_path,
        "plug_a",
        """
        from bench.api import register_estimator
        from estimators.full import Full
        @register_estimator
        class A(Full):
            name = "plug-a"
    """,
    )
    b = _plugin(
        tmp_path,
        "plug_b",
        """
        from bench.api import register_estimator
        from estimators.sdo import SDO
        @register_estimator
        class B(SDO):
            name = "plug-b"
    """,
    )
    hashes = [
        subprocess.run(
            [sys.executable, "-c", HASH_OF, "plug-a", *order], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout.strip()
        for order in ([str(a), str(b)], [str(b), str(a)])
    ]
    assert hashes[0] and hashes[0] == hashes[1]


def test_the_code_hash_follows_what_an_estimator_uses(tmp_path, monkeypatch):
    """A plug-in subclass of full depends on the masked chain full uses, and on its own helper
    module; a change to either changes the hash (so its cells rerun)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    helper = _plugin(
        tmp_path,
        "diffgrad_test_helper",
        """
        def scale():
            return 1.0
    """,
    )
    plugin = _plugin(
        tmp_path,
        "uses_helper",
        """
        from bench.api import register_estimator
        from estimators.full import Full
        from diffgrad_test_helper import scale
        @register_estimator
        class UsesHelper(Full):
            name = "test-uses-helper"
    """,
    )
    include(plugin)
    cls = ESTIMATORS.get("test-uses-helper")
    modules = code_modules(cls)
    assert {"estimators.masked_chain", "bench.chain", "diffgrad_test_helper"} <= set(modules)
    assert not any(name.split(".")[0] in ("torch", "diffusers", "random") for name in modules)
    before = code_hash(cls)
    time.sleep(0.01)
    helper.write_text("def scale():\n    return 2.0\n")
    os.utime(helper, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse clocks
    assert code_hash(cls) != before


def test_trained_weights_are_in_the_cell_key(tmp_path):
    from tasks.digits import paths
    from digits_fixtures import write_random_models

    one, two = write_random_models(tmp_path / "one", seed=0), write_random_models(tmp_path / "two", seed=1)
    keys = []
    for folder in (one, two, one):
        spec = SweepSpec(tasks=[f"digits[models={one}]"], estimators=["full"], targets=["cond"], steps=[2])
        if folder is two:  # the same path, retrained weights
            paths_before = {name: (one / name).read_bytes() for name in paths.FILES}
            for name in paths.FILES:
                (one / name).write_bytes((two / name).read_bytes())
        keys.append(expand(spec, *resolve(spec))[0].key)
        if folder is two:
            for name, data in paths_before.items():
                (one / name).write_bytes(data)
    assert keys[0] != keys[1] and keys[0] == keys[2]


# -- 7: duplicates --------------------------------------------------------------------------------


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


# -- 10, 11: failures inside a cell are rows ------------------------------------------------------

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


# -- 13: row strings are plain text in figures and pages ------------------------------------------


def test_markup_in_row_strings_is_plain_text_in_reports(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(["run", *FAST, "--steps", "2,3", "--estimators", "full,sdo", "--targets", "cond", "--out", str(run_dir)])
        == 0
    )
    text = (run_dir / "rows.jsonl").read_text().replace('"sdo"', '"$x^2$ *bold* <b>|"')
    (run_dir / "rows.jsonl").write_text(text)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report"), "--svg"]) == 0
    page = (tmp_path / "report" / "index.md").read_text()
    assert r"\$x^2\$ \*bold\* \<b\>\|" in page
    assert "$x^2$ *bold* &lt;b&gt;|" in (tmp_path / "report" / "index.html").read_text()
    svg = next((tmp_path / "report").glob("*.svg")).read_text()
    assert "$x^2$ *bold*" in svg  # drawn as typed, not as math


# -- figures: identical rows, identical files -----------------------------------------------------


def test_figures_from_unchanged_rows_are_byte_identical_to_the_committed_ones(tmp_path):
    from bench.figures import FIGURES, render_all

    render_all(FIGURES, tmp_path)
    committed = sorted(p for p in FIGURES.iterdir() if p.suffix in (".svg", ".png", ".md"))
    assert len(committed) >= 9
    changed = [p.name for p in committed if (tmp_path / p.name).read_bytes() != p.read_bytes()]
    assert not changed, f"regenerating changed {changed}: figures must be reproducible (and committed)"


# -- 15: the checkpoint's forward count -----------------------------------------------------------


class _TanhPlusBias(nn.Module):
    """eps = tanh(x) + b: the first step, with x_N a constant, saves nothing for backward."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.full((3,), 0.1, dtype=torch.float64))

    def forward(self, x, t, cond):
        return torch.tanh(x) + self.b


@pytest.mark.parametrize("target,forwards", [("weights", 7), ("latent", 8)])
def test_checkpoint_forward_count_is_modelled_exactly(target, forwards):
    denoiser = _TanhPlusBias()
    schedule = Schedule.from_scheduler(DDIMScheduler(timestep_spacing="trailing", clip_sample=False), 4)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=target == "latent")
    problem = Problem(
        Chain(denoiser, schedule),
        x,
        None,
        None,
        lambda x0: -(x0**2).sum(-1),
        target,
        [denoiser.b] if target == "weights" else [x],
    )
    estimator = ESTIMATORS.create("checkpoint")
    estimator(problem, random.Random(0))
    cost = estimator.cost_for(problem)
    assert problem.chain.counter.forward == forwards == cost.nfe_forward
    full = Problem(Chain(denoiser, schedule), x, None, None, problem.reward_fn, target, problem.leaves)
    exact = [leaf.grad.clone() for leaf in problem.leaves]
    ESTIMATORS.create("full")(full, random.Random(0))
    for leaf, grad in zip(full.leaves, exact):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-12, atol=1e-12)


# -- the plug-in author's surface -----------------------------------------------------------------


def test_one_public_module_and_list_names_the_included_file(tmp_path, capsys, monkeypatch):
    import bench.api

    for name in (
        "Estimator",
        "Estimate",
        "Cost",
        "Option",
        "SpecError",
        "SkipCell",
        "Problem",
        "Chain",
        "Schedule",
        "noise_for",
        "run_masked_chain",
        "torch_generator",
        "backprop",
        "register_estimator",
        "Task",
        "register_task",
    ):
        assert name in bench.api.__all__ and hasattr(bench.api, name)
    example = ROOT / "examples" / "checkpointed_draft.py"
    assert "from bench.api import" in example.read_text()
    result = subprocess.run(
        [sys.executable, "-m", "bench", "list", "draft-ckpt", "--include", str(example)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert result.returncode == 0, result.stderr
    assert f"{example}:CheckpointedDraft" in result.stdout
