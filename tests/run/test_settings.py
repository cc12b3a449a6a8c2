"""Run settings are declared once (bench/run/settings.py): SweepSpec, the run command's flags, a sweep
file's keys, the checks and the table of run options in docs/cli.md all come from the declaration."""

import dataclasses
import re
from pathlib import Path

import pytest

from bench.run import plan, runner, settings
from bench.cli import build_parser, main, sweep_of
from bench.errors import SpecError
from bench.run.settings import INT, SETTINGS, Setting, SweepSpec
from bench.run.sweepfile import build

CLI_PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
TOY = "toy[d=2,batch=2]"
# the run command's flags that are not settings of a sweep part: the run itself and the launcher
RUN_ONLY = {"-h", "--help", "--config", "--out", "--force", "--remeasure", "--no-progress"}
LAUNCHER = {
    "--launcher",
    "--partition",
    "--time-min",
    "--gpus-per-job",
    "--cpus-per-job",
    "--array-parallelism",
    "--cells-per-job",
    "--sbatch",
    "--detach",
}


def _run_parser():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices["run"]


def _sweep(argv):
    return sweep_of(build_parser().parse_args(["run", *argv]))


def test_every_field_has_one_setting_and_every_run_flag_comes_from_one():
    names = [s.name for s in SETTINGS]
    assert names == [f.name for f in dataclasses.fields(SweepSpec)]  # one each, in the field order
    assert plan.SweepSpec is runner.SweepSpec is SweepSpec
    keys = [s.key for s in SETTINGS]
    assert len(set(keys)) == len(keys)
    declared = [flag for s in SETTINGS for flag in s.flags()]
    assert len(set(declared)) == len(declared)
    actions = _run_parser()._actions
    flags = {flag for action in actions for flag in action.option_strings}
    assert flags == set(declared) | RUN_ONLY | LAUNCHER
    for action in actions:  # each flag that sets a field is a setting's
        if action.dest in names:
            assert set(action.option_strings) <= set(settings.lookup(action.dest).flags()), action.option_strings


def test_the_defaults_are_the_declared_ones():
    assert dataclasses.asdict(SweepSpec()) == {s.name: s.default for s in SETTINGS}
    assert SweepSpec() == SweepSpec(
        tasks=["digits"],
        estimators=["full", "checkpoint", "adjoint", "sdo", "truncated[k=2]"],
        targets=["latent", "cond", "weights"],
        steps=[10, 20],
        seeds=[0],
        iters=4,
        warmup=1,
        rounds=3,
        memory="auto",
        timeout=1800.0,
        device="cpu",
        includes=[],
        isolate="auto",
        threads=0,
        interleave=True,
        baseline="full",
        stable=0.0,
        timing_cap=0.0,
        budget=0.0,
    )
    first, second = SweepSpec(), SweepSpec()
    first.steps.append(99)
    assert second.steps == [10, 20]  # a list default is each instance's own
    assert _sweep([]).parts == [SweepSpec()]


def test_flags_to_a_spec_to_a_dict_and_back(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("")
    b.write_text("")
    argv = [
        "--tasks",
        TOY,
        "--estimators",
        "full,sdo",
        "--targets",
        "cond",
        "--steps",
        "3,4",
        "--seeds",
        "1,2",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--rounds",
        "2",
        "--no-memory",
        "--memory-limit",
        "12GiB",
        "--timeout",
        "0",
        "--device",
        "cpu",
        "--include",
        str(a),
        "--include",
        str(b),
        "--isolate",
        "none",
        "--threads",
        "1",
        "--no-interleave",
        "--baseline",
        "sdo",
        "--stable",
        "0.05",
        "--timing-cap",
        "7",
        "--budget",
        "2.5",
    ]
    (spec,) = _sweep(argv).parts
    assert dataclasses.asdict(spec) == {
        "tasks": [TOY],
        "estimators": ["full", "sdo"],
        "targets": ["cond"],
        "steps": [3, 4],
        "seeds": [1, 2],
        "iters": 2,
        "warmup": 0,
        "rounds": 2,
        "memory": "off",
        "memory_limit": "12GiB",
        "timeout": None,
        "device": "cpu",
        "includes": [str(a), str(b)],
        "isolate": "none",
        "threads": 1,
        "interleave": False,
        "baseline": "sdo",
        "stable": 0.05,
        "timing_cap": 7.0,
        "budget": 2.5,
    }
    again = SweepSpec(**dataclasses.asdict(spec))  # as run.json, isolate and the jobs carry it
    assert again == spec
    settings.check_spec(again)


def test_a_sweep_file_names_the_same_settings(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text(
        f'tasks = "{TOY}"\nsteps = [3]\ntiming-cap = 5\ninclude = []\ninterleave = false\nmemory = "off"\n'
    )
    (spec,) = build(config, {}, {}, None).parts
    assert (spec.tasks, spec.steps, spec.timing_cap, spec.includes, spec.interleave, spec.memory) == (
        [TOY],
        [3],
        5.0,
        [],
        False,
        "off",
    )


def test_a_file_value_refused_by_a_check_names_the_file_and_key(tmp_path):
    config = tmp_path / "s.toml"
    config.write_text("iters = -1\n")
    with pytest.raises(SpecError, match=re.escape(f"{config}: iters must be >= 0, got -1")):
        build(config, {}, {}, None)
    config.write_text("[[part]]\nsteps = [2]\n[[part]]\nstable = 1.5\n")
    with pytest.raises(SpecError, match=re.escape(f"{config} part 2: stable must be a fraction in [0, 1)")):
        build(config, {}, {}, None)
    with pytest.raises(SpecError, match=re.escape("--stable must be a fraction")):  # a flag overrides the file
        build(config, {"stable": 2.0}, {}, None)


def test_a_spec_built_in_code_is_checked_when_it_is_resolved():
    with pytest.raises(SpecError, match="--rounds must be >= 1, got 0"):
        plan.resolve(SweepSpec(tasks=[TOY], steps=[2], rounds=0))
    with pytest.raises(SpecError, match="--iters: iters must be an integer, got '2'"):
        plan.resolve(SweepSpec(tasks=[TOY], steps=[2], iters="2"))
    with pytest.raises(SpecError, match="unknown isolation 'both'; valid: auto, cell, none"):
        plan.resolve(SweepSpec(tasks=[TOY], steps=[2], isolate="both"))


NEW = Setting(
    "patience",
    INT,
    3,
    "rounds of patience (a test's setting)",
    lambda value, context: None if value % 2 else f"{{setting}} must be odd, got {value}",
    metavar="N",
)


@pytest.fixture
def with_a_new_setting(monkeypatch):
    """A setting added to the table, and nowhere else."""
    monkeypatch.setattr(settings, "SETTINGS", SETTINGS + (NEW,))


def test_a_new_setting_is_a_flag_a_key_a_field_a_check_and_a_row_of_the_table(with_a_new_setting, tmp_path, capsys):
    assert "--patience" in {flag for action in _run_parser()._actions for flag in action.option_strings}
    (spec,) = _sweep(["--patience", "5"]).parts
    assert spec.patience == 5 and _sweep([]).parts[0].patience == 3
    assert dataclasses.asdict(spec)["patience"] == 5
    config = tmp_path / "s.toml"
    config.write_text("patience = 7\n")
    assert build(config, {}, {}, None).parts[0].patience == 7
    assert "| `--patience N` | `patience` | integer | `3` | rounds of patience (a test's setting) |" in (
        settings.readme_table()
    )
    with pytest.raises(SpecError, match="--patience must be odd, got 4"):
        _sweep(["--patience", "4"])
    config.write_text("patience = 4\n")
    with pytest.raises(SpecError, match=re.escape(f"{config}: patience must be odd, got 4")):
        build(config, {}, {}, None)
    config.write_text("patience = 'x'\n")
    with pytest.raises(SpecError, match="patience must be an integer, got 'x'"):
        build(config, {}, {}, None)
    assert main(["run", "--tasks", TOY, "--steps", "2", "--patience", "6", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == "error: --patience must be odd, got 6\n"
    assert not (tmp_path / "r").exists()


def test_the_docs_table_of_run_options_is_the_declaration():
    text = CLI_PAGE.read_text()
    table = re.search(r"<!-- run-options:start -->\n(.*?)\n<!-- run-options:end -->", text, re.DOTALL)
    assert table, "docs/cli.md lacks the run-options:start/run-options:end markers"
    assert table.group(1) == settings.readme_table(), (
        "docs/cli.md's run options are stale: run python -m bench.cli.docs"
    )
    for setting in SETTINGS:
        assert f"`{setting.flag}" in table.group(1) and f"`{setting.key}`" in table.group(1)


def test_the_flags_help_shows_each_default():
    text = " ".join(_run_parser().format_help().split())
    for expected in (
        "(default: 1800)",
        "(default: full,checkpoint,adjoint,sdo,truncated[k=2])",
        "(default: auto)",
        "(default: 10,20)",
        "same as --memory off",
    ):
        assert expected in text, expected
