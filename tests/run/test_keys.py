"""A cell's key covers every piece of code that can change what it computes, and nothing else: a
sampler's code, the reference estimator's code and a plug-in's helper values re-key the cells that
use them; a docstring or a comment re-keys nothing (issue 21, items 1, 2, 7 and 8)."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.run.identity import code_hash
from bench.registry import ESTIMATORS, include

ROOT = Path(__file__).resolve().parents[2]

# The keys of a sweep as the code of the folder it runs in computes them: estimator -> key, one
# cell per estimator (toy latent N=2), flow-euler cells under `flow:`.
KEYS_OF = textwrap.dedent("""
    import json
    from bench.run.runner import SweepSpec, plan
    keys = {}
    for task, label in (("toy[d=2,batch=2]", ""), ("toy[d=2,batch=2,sampler=flow-euler]", "flow:")):
        spec = SweepSpec(tasks=[task], estimators=["full", "sdo", "truncated[k=1]"], targets=["latent"], steps=[2])
        for _, cells in plan([spec]):
            keys.update({label + c.estimator.spec: c.key for c in cells})
    print(json.dumps(keys))
""")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of the code (no weights) that a test may edit as a user would."""
    root = tmp_path_factory.mktemp("code")
    ignore = shutil.ignore_patterns("__pycache__", "*.safetensors", "*.pt", "*.npz", "weights")
    for package in ("bench", "estimators", "tasks"):
        shutil.copytree(ROOT / package, root / package, ignore=ignore)
    return root


def _keys(tree: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", KEYS_OF], cwd=tree, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _add_code(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n\n{line}\n")


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_code_edits_rekey_the_cells_that_run_it_and_documentation_edits_rekey_nothing(tree):
    assert (tree / "bench" / "run" / "runner.py").is_file()
    before = _keys(tree)
    assert len(set(before.values())) == 6

    # 2: a docstring and a comment of the chain every cell runs re-key nothing
    chain = tree / "bench" / "chain.py"
    _edit(chain, '"""', '"""A docstring edited by a user. ')
    chain.write_text(chain.read_text() + "\n# a comment a user added\n\n")
    assert _keys(tree) == before

    # 1: a line of code in the DDIM sampler re-keys the DDIM cells, not the flow-euler ones
    _add_code(tree / "bench" / "samplers" / "ddim.py", "EDITED_BY_A_USER = 1")
    after_sampler = _keys(tree)
    for name, key in before.items():
        assert (after_sampler[name] == key) == name.startswith("flow:"), name

    # 7: the reference estimator's code is in the key of every cell measured against it
    _add_code(tree / "estimators" / "full.py", "EDITED_BY_A_USER = 1")
    after_reference = _keys(tree)
    assert all(after_reference[name] != after_sampler[name] for name in before)


def test_a_docstring_edit_does_not_change_the_code_hash_but_a_code_edit_does(tmp_path, monkeypatch):
    """Item 8: a helper's value imported by name (`from helper import SCALE`) is followed, and only
    the code of what is followed counts."""
    monkeypatch.syspath_prepend(str(tmp_path))
    helper = tmp_path / "diffgrad_keys_helper.py"
    helper.write_text('"""A helper."""\nSCALE = 1.0\n')
    plugin = tmp_path / "uses_a_value.py"
    plugin.write_text(
        textwrap.dedent("""
        from bench.api import register_estimator
        from estimators.full import Full

        @register_estimator
        class UsesAValue(Full):
            name = "test-uses-a-value"

            def estimate(self, problem, rng):
                from diffgrad_keys_helper import SCALE  # a value, imported where it is used
                return super().estimate(problem, rng)
    """)
    )
    include(plugin)
    cls = ESTIMATORS.get("test-uses-a-value")
    before = code_hash(cls)
    helper.write_text('"""A helper, its docstring edited."""\n# a comment\nSCALE = 1.0\n')
    assert code_hash(cls) == before
    helper.write_text('"""A helper."""\nSCALE = 2.0\n')
    assert code_hash(cls) != before


def test_a_run_reuses_rows_after_a_docstring_edit_and_recomputes_them_after_a_sampler_edit(tree, tmp_path):
    """The same through the command line, as a user editing the code would."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--tasks",
        "toy[d=2,batch=2]",
        "--estimators",
        "full,sdo",
        "--targets",
        "latent",
        "--steps",
        "2",
        "--iters",
        "0",
        "--rounds",
        "1",
        "--no-memory",
        "--no-progress",
        "--out",
        str(out),
    ]

    def rows() -> list[dict]:
        done = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]

    assert len(rows()) == 2
    _edit(tree / "bench" / "samplers" / "ddim.py", '"""', '"""Edited again. ')
    assert len(rows()) == 2
    _add_code(tree / "bench" / "samplers" / "ddim.py", "EDITED_AGAIN = 2")
    assert len(rows()) == 4


def test_a_reward_given_by_file_is_in_the_key(tmp_path):
    """A reward resolved by name at run time (sd[reward=file.py:function]) re-keys its cells when
    its code changes, and not when its docstring does."""
    from bench.run.runner import SweepSpec, plan

    reward = tmp_path / "my_reward.py"
    reward.write_text('"""Mine."""\ndef score(images):\n    return images.mean(dim=(1, 2, 3))\n')
    spec = SweepSpec(tasks=[f"sd[reward={reward}:score]"], estimators=["sdo"], targets=["latent"], steps=[2])

    def key() -> str:
        return plan([spec])[0][1][0].key

    before = key()
    reward.write_text('"""Mine, documented."""\ndef score(images):\n    return images.mean(dim=(1, 2, 3))\n')
    assert key() == before
    reward.write_text('"""Mine."""\ndef score(images):\n    return -images.mean(dim=(1, 2, 3))\n')
    assert key() != before


def test_remeasure_measures_time_or_memory_again_and_keeps_the_gradients(tmp_path, capsys):
    """Item 9: the measuring harness is in no key, by design; --remeasure time,memory measures a
    cell again without computing its gradients, optimisation or evaluation again."""
    from bench.results import store
    from bench.cli import main
    from bench.run.runner import SweepSpec, run_sweep

    spec = SweepSpec(
        tasks=["toy[d=2,batch=2]"],
        estimators=["full", "sdo"],
        targets=["latent"],
        steps=[2],
        iters=1,
        rounds=1,
        memory="inprocess",
    )
    out = tmp_path / "out"
    first = {row["key"]: row for row in run_sweep(spec, out)}
    again = {row["key"]: row for row in run_sweep(spec, out, remeasure=frozenset({"time"}))}
    assert len(store.read_rows(out)) == 4 and again.keys() == first.keys()
    for key, row in again.items():
        assert row["remeasured"] == ["time"] and row["status"] == "ok"
        assert "agreement" not in row["phase_s"] and "optimise" not in row["phase_s"] and "timing" in row["phase_s"]
        assert "memory" not in row["phase_s"]
        for kept in ("grad_cos", "grad_rel_err", "nfe_forward", "reward_curve", "peak_mem_bytes", "eval_reward"):
            assert row[kept] == first[key][kept], kept
        assert row["time_rounds_s"] != first[key]["time_rounds_s"]
    memory = {row["key"]: row for row in run_sweep(spec, out, remeasure=frozenset({"memory"}))}
    assert all(
        row["remeasured"] == ["memory"]
        and "memory" in row["phase_s"]
        and "timing" not in row["phase_s"]
        and row["time_rounds_s"] == again[key]["time_rounds_s"]
        for key, row in memory.items()
    )
    assert store.latest_by_key(store.read_rows(out)).keys() == first.keys()

    for bad, message in (
        (["--remeasure", "speed"], "is not a list of time, memory"),
        (["--remeasure", "time", "--launcher", "submitit-local"], "--remeasure runs in this process"),
    ):
        assert (
            main(
                [
                    "run",
                    "--tasks",
                    "toy[d=2,batch=2]",
                    "--steps",
                    "2",
                    "--no-progress",
                    "--out",
                    str(tmp_path / "bad"),
                    *bad,
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
