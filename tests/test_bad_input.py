"""Input the command line refuses before anything runs: every subcommand, each bad input one line
on stderr and exit status 2, no traceback, nothing written (issue 9's audit, redone)."""
import pytest

from bench.cli import main

TOY = "toy[d=2,batch=2]"


def _run(*args):
    return ["run", "--tasks", TOY, "--steps", "2", "--no-progress", *args]


BAD = [
    # run: empty lists
    (["run", "--estimators", "", "--tasks", TOY], "--estimators is empty"),
    (["run", "--targets", "", "--tasks", TOY], "--targets is empty"),
    (["run", "--tasks", ""], "--tasks is empty"),
    (_run("--steps", ""), "--steps is empty"),
    (_run("--seeds", ""), "--seeds is empty"),
    (_run("--steps", " , "), "--steps is empty"),
    # run: numbers out of range
    (_run("--steps", "1001"), "exceeds the 1000 training timesteps"),
    (["run", "--steps", "5000"], "exceeds the 1000 training timesteps"),  # digits, the default task
    (_run("--steps", "0"), "step count must be a positive integer, got 0"),
    (_run("--seeds", "99999999999999999999"), "out of range"),
    (_run("--seeds", "-1"), "seed -1 is out of range"),
    (_run("--timeout", "inf"), "--timeout must be a finite number"),
    (_run("--timeout", "nan"), "--timeout must be a finite number"),
    (_run("--timeout", "-1"), "--timeout must be a finite number"),
    (_run("--iters", "-1"), "--iters must be >= 0"),
    (_run("--rounds", "0"), "--rounds must be >= 1"),
    (_run("--warmup", "-2"), "--warmup must be >= 0"),
    (_run("--iters", "many"), "invalid int value"),
    # run: options that pass a first look and fail later
    (["run", "--tasks", "toy[eta=inf]", "--steps", "2"], "must be a finite number"),
    (["run", "--tasks", "toy[eta=nan]", "--steps", "2"], "must be a finite number"),
    (_run("--estimators", "zeroth-order[mu=inf]"), "must be a finite number"),
    (_run("--estimators", "zeroth-order[mu=-inf]"), "must be a finite number"),
    (_run("--estimators", "sdo[step=\u00b2]"), "must be first, last, random or a 0-based step index"),
    (_run("--estimators", "sdo[step=5]"), "outside the chain"),
    (_run("--estimators", "truncated[k=1,k=2]"), "given twice"),
    (_run("--estimators", "truncated[k=2"), "unbalanced brackets"),
    (_run("--estimators", "adjoint[recover=foo]"), "is not one of backward, cache"),
    (_run("--estimators", "score-function[clip=1.5]"), "must be in [0, 1)"),
    (_run("--estimators", "truncated[rand=true,k_min=3,k_max=2]"), "k_min=3 is above k_max=2"),
    (_run("--estimators", "full[]x"), "cannot read"),
    (["run", "--tasks", "toy[spacing=middle]", "--steps", "2"], "is not one of trailing, leading, linspace"),
    (["run", "--tasks", "toy[offset=-1]", "--steps", "2"], "must be >= 0"),
    (["run", "--tasks", "digits[models=/nonexistent]", "--steps", "2"], "not a folder of digits models"),
    (["run", "--tasks", "digits[digit=11]", "--steps", "2"], "must be a digit 0..9"),
    (_run("--memory", "bogus"), "unknown memory mode 'bogus'"),
    (_run("--device", "tpu"), "unknown device 'tpu'"),
    (_run("--device", "cuda:0"), "CUDA is not available"),
    (_run("--include", "nowhere.py"), "no such Python file"),
    (_run("--bogus-flag"), "unrecognized arguments: --bogus-flag"),
    # run: output folders that cannot hold a run
    (_run("--out", ""), "--out: is empty"),
    (_run("--out", "{file}"), "is not a folder"),
    (_run("--out", "/dev/null"), "is not a folder"),
    (_run("--out", "{file}/sub"), "cannot create the folder"),
    (_run("--out", "/proc/diffgrad-bench-out"), "cannot create the folder"),
    # report
    (["report", "/nonexistent/run"], "is not a run folder"),
    (["report", ""], "DIR: is empty"),
    (["report", "{tmp}", "--out", "/dev/null"], "is not a folder"),
    (["report", "{tmp}", "--out", ""], "--out: is empty"),
    # compare
    (["compare", "{tmp}", "{tmp}", "--factor", "nan"], "--factor must be a finite number > 1"),
    (["compare", "{tmp}", "{tmp}", "--factor", "inf"], "--factor must be a finite number > 1"),
    (["compare", "{tmp}", "{tmp}", "--factor", "0.5"], "--factor must be a finite number > 1"),
    (["compare", "/nonexistent/a", "/nonexistent/b"], "is not a run folder"),
    (["compare", "", "{tmp}"], "DIR_A: is empty"),
    # figures
    (["figures", "--only", "no-such-figure"], "unknown figure 'no-such-figure'"),
    (["figures", "--specs", "/nonexistent/specs"], "is not a folder of figure specs"),
    (["figures", "--out", "/dev/null"], "is not a folder"),
    # list and check
    (["list", "nosuch"], "unknown estimator 'nosuch'"),
    (["list", "--include", "nowhere.py"], "no such Python file"),
    (["check", "nope"], "unknown estimator 'nope'"),
    (["check", "sdo[step=x]"], "must be first, last, random"),
    (["check", "truncated[k=0]"], "must be >= 1"),
    # subcommands
    (["rnu"], "unknown command 'rnu'; did you mean 'run'?"),
    (["repot"], "did you mean 'report'?"),
    (["figure"], "did you mean 'figures'?"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a)[:60] or "(none)" for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    argv = [arg.replace("{file}", str(a_file)).replace("{tmp}", str(tmp_path)) for arg in argv]
    if argv and argv[0] == "run" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("rows.jsonl"))


def test_there_are_at_least_forty_and_every_subcommand_is_covered():
    assert len(BAD) >= 40
    assert {argv[0] for argv, _ in BAD if argv} >= {"run", "report", "compare", "figures", "list", "check"}
