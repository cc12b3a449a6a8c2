"""Input the command line refuses before anything runs: every subcommand, each bad input one line
on stderr and exit status 2, no traceback, nothing written (issue 9's audit, redone)."""

import json

import pytest

from bench.results import store
from bench.cli import main
from bench.run.sweepfile import build

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
    # run: numbers out of range (issue 21)
    (_run("--threads", "1000"), "is more threads than"),
    (_run("--threads", "99999999999999999999"), "is more threads than"),
    (_run("--threads", "1e20"), "argument --threads: invalid int value: '1e20'"),
    (_run("--timeout", "1e300"), "timeout must be at most 31536000 seconds (a year)"),
    (_run("--timing-cap", "1e300"), "timing_cap must be at most 31536000 seconds (a year)"),
    (_run("--budget", "1e300"), "budget must be at most 31536000 seconds (a year)"),
    # run: a baseline the sweep does not run (no ratios could be taken to it)
    (
        _run("--estimators", "sdo,checkpoint", "--baseline", "full"),
        "--baseline full is not among the sweep's estimators (sdo, checkpoint)",
    ),
    (_run("--estimators", "sdo", "--baseline", "truncated[k=2]"), "is not among the sweep's estimators (sdo)"),
    # run: launcher strings go into the sbatch script: no control character, keys that are option names
    (_run("--launcher", "slurm", "--partition", "gpu\n#SBATCH --wrap=id"), "holds a control character (U+000A)"),
    (_run("--launcher", "slurm", "--partition", "gpu\x7f"), "holds a control character (U+007F)"),
    (_run("--launcher", "slurm", "--sbatch", "account=lab\n#SBATCH --wrap=id"), "holds a control character"),
    (_run("--launcher", "slurm", "--sbatch", "account=l\rab"), "holds a control character (U+000D)"),
    (_run("--launcher", "slurm", "--sbatch", "acc ount=lab"), "a key is an sbatch option's name"),
    (_run("--launcher", "slurm", "--sbatch", "wrap\n#SBATCH --x=y"), "a key is an sbatch option's name"),
    # run: output folders that cannot hold a run
    (_run("--out", "{tmp}/" + "a" * 300), "cannot create the folder (File name too long)"),
    (_run("--out", ""), "--out: is empty"),
    (_run("--out", "{file}"), "is not a folder"),
    (_run("--out", "/dev/null"), "is not a folder"),
    (_run("--out", "{file}/sub"), "cannot create the folder"),
    (_run("--out", "/proc/diffgrad-bench-out"), "cannot create the folder"),
    # report
    (["report", "/nonexistent/run"], "is not a run folder"),
    (["report", "{tmp}/" + "a" * 300], "is not a run folder"),
    (["report", "{tmp}", "--out", "{tmp}/" + "a" * 300], "cannot create the folder (File name too long)"),
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
    (["figures", "--specs", "{tmp}/" + "a" * 300], "is not a folder of figure specs"),
    (["figures", "--out", "/dev/null"], "is not a folder"),
    # status
    (["status", "{tmp}/" + "a" * 300], "is not a run folder"),
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


# Bad input in files: each case writes FILES under the test's folder (None: a folder), then runs argv.
BAD_FILES = [
    # sweep files
    ({"deep.toml": b"a = " + b"[" * 5000 + b"]" * 5000}, ["run", "--config", "{tmp}/deep.toml"], "nested too deeply"),
    (
        {"deep.toml": b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000},
        ["run", "--config", "{tmp}/deep.toml"],
        "nested too deeply",
    ),
    (
        {"s.toml": b'estimators = ["sdo"]\nbaseline = "full"\n'},
        _run("--config", "{tmp}/s.toml"),
        "s.toml: baseline full is not among the sweep's estimators (sdo)",
    ),
    ({"s.toml": b"threads = 100000\n"}, _run("--config", "{tmp}/s.toml"), "s.toml: threads 100000 is more threads"),
    ({"s.toml": b"timeout = 1e300\n"}, _run("--config", "{tmp}/s.toml"), "timeout must be at most 31536000 seconds"),
    (
        {"s.toml": b'[launcher]\nname = "slurm"\npartition = "gpu\\n#SBATCH --wrap=id"\n'},
        _run("--config", "{tmp}/s.toml"),
        "launcher option partition 'gpu\\n#SBATCH --wrap=id' holds a control character",
    ),
    (
        {"s.toml": b'[launcher]\nname = "slurm"\nsbatch = { "qos\\n#SBATCH --wrap=id" = "high" }\n'},
        _run("--config", "{tmp}/s.toml"),
        "a key is an sbatch option's name",
    ),
    (
        {"s.toml": b'[launcher]\nname = "slurm"\nsbatch = { account = "lab\\u0000" }\n'},
        _run("--config", "{tmp}/s.toml"),
        "holds a control character (U+0000)",
    ),
    (
        {"s.toml": b'[launcher]\nname = "slurm"\nsbatch = { account = ["lab"] }\n'},
        _run("--config", "{tmp}/s.toml"),
        "the value must be a string, a number or true",
    ),
    # a run folder whose rows file is a folder
    ({"out/rows.jsonl": None}, _run("--out", "{tmp}/out"), "rows.jsonl is not a file, so no row can be appended"),
    # an include file that ends the program while it is imported
    ({"exits.py": b"import sys\nsys.exit(0)\n"}, _run("--include", "{tmp}/exits.py"), "exits.py called sys.exit(0)"),
    ({"exits.py": b"raise SystemExit('bye')\n"}, ["list", "--include", "{tmp}/exits.py"], "called sys.exit('bye')"),
    (
        {"exits.py": b"import sys\nsys.exit(3)\n"},
        ["check", "--include", "{tmp}/exits.py", "full"],
        "called sys.exit(3)",
    ),
    # figure specs
    (
        {"specs/a.toml": b'title = 5\nkind = "tradeoff"\nsource = "x"\nclaim = "c"\n'},
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "a.toml: title must be a string, got 5",
    ),
    (
        {"specs/a.toml": b'title = "t"\nkind = "frontier"\nsource = "x"\nclaim = "c"\n[options]\nsteps = "ten"\n'},
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "option steps must be an integer, got 'ten'",
    ),
    (
        {
            "specs/a.toml": b'title = "t"\nkind = "frontier"\nsource = "x"\nclaim = "c"\n[options]\nsteps = 2\n'
            b"cosine = true\n"
        },
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "option cosine must be a number, got True",
    ),
    (
        {"specs/a.toml": b'title = "t"\nkind = "tradeoff"\nsource = "x"\nclaim = "c"\noptions = "full"\n'},
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "options must be a table",
    ),
    (
        {"specs/a.toml": b'title = "t"\nkind = "tradeoff"\nsource = "x"\nclaim = "c"\n[options]\nbase = "x"\n'},
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "unknown option 'base' of kind 'tradeoff'",
    ),
    (
        {"specs/a.toml": b'title = "t"\nkind = "frontier"\nsource = "x"\nclaim = "c"\n'},
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "kind 'frontier' needs the option(s) steps",
    ),
    (
        {"specs/a.toml": b'title = "t"\nkind = "tradeoff"\nsource = "nowhere"\nclaim = "c"\n'},
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "source nowhere is not a run folder",
    ),
    (
        {"specs/a.toml": b'title = "\xff\xfe"\n'},
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "a.toml: not a figure spec (TOML in UTF-8)",
    ),
    (
        {"specs/a.toml": None},
        ["figures", "--specs", "{tmp}/specs", "--out", "{tmp}/figs"],
        "a.toml: cannot be read as a figure spec (Is a directory)",
    ),
]


def _write(root, files):
    for name, content in files.items():
        path = root / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


@pytest.mark.parametrize(
    "files,argv,message", BAD_FILES, ids=[f"{' '.join(a)[:40]}: {m[:30]}" for _, a, m in BAD_FILES]
)
def test_bad_input_in_files_is_one_line_and_exit_2(tmp_path, capsys, files, argv, message):
    _write(tmp_path, files)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    if argv[0] == "run" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not [path for path in tmp_path.rglob("*.json*") if path.is_file()] and not (tmp_path / "figs").exists()


def test_a_sweep_file_with_a_byte_order_mark_reads(tmp_path):
    config = tmp_path / "s.toml"
    config.write_bytes(b"\xef\xbb\xbf" + b'steps = [2]\ntasks = "toy[d=2,batch=2]"\n')
    sweep = build(config, {}, {}, None)
    assert sweep.parts[0].steps == [2] and sweep.parts[0].tasks == ["toy[d=2,batch=2]"]


# A run folder with a damaged record: `status` skips it with a one-line warning and still reports.
ROW = {"status": "ok", "task": TOY, "estimator": "full", "target": "latent", "steps": 2, "seed": 0}
DAMAGED = [
    ("jobs.jsonl", b"garbage\n", "jobs.jsonl: skipping line 1: not JSON"),
    ("jobs.jsonl", b"\xff\xfe\xfd\n", "jobs.jsonl: skipping line 1: not UTF-8"),
    ("jobs.jsonl", b"[1, 2]\n", "jobs.jsonl: skipping line 1: not a JSON object (list)"),
    ("jobs.jsonl", b'{"job": "1", "cells": 5, "launcher": "slurm"}\n', "field 'cells' has the wrong type (int)"),
    ("jobs.jsonl", b'{"job": [1], "cells": []}\n', "field 'job' has the wrong type (list)"),
    ("jobs.jsonl", b'{"job": "1", "cells": [1]}\n', "field 'cells' is not a list of cell keys"),
    (
        "jobs.jsonl",
        b'{"job": "1", "cells": [], "host": "{host}", "pid": "x", "pid_start": "1"}\n',
        "field 'pid' has the wrong type (str)",
    ),
    ("rows.d/j.claim.json", b"[1]", "j.claim.json: ignoring this claim: not a JSON object (list)"),
    ("rows.d/j.claim.json", b"5", "ignoring this claim: not a JSON object (int)"),
    ("rows.d/j.claim.json", b'"a string"', "ignoring this claim: not a JSON object (str)"),
    ("rows.d/j.claim.json", b'{"job": "j", "cells": 5}', "ignoring this claim: field 'cells' has the wrong type"),
    ("rows.d/j.claim.json", b"\xff", "ignoring this claim: not UTF-8"),
    ("rows.d/j.claim.json", None, "ignoring this claim: cannot be read (Is a directory)"),
    ("run.json", b"[1]", "run.json: not a JSON object; ignored"),
    ("run.json", b"5", "run.json: not a JSON object; ignored"),
    ("run.json", b'"a string"', "run.json: not a JSON object; ignored"),
    ("run.json", b'{"cells": 5}', "run.json: 'cells' is not a list"),
    ("run.json", b'{"cells": [1, {"key": 1}]}', "run.json: skipping 2 of its 2 'cells' that are not cells"),
    ("run.json", b'{"launcher": "slurm", "config": 5}', None),
    ("run.json", None, "run.json: unreadable (IsADirectoryError); ignored"),
    ("rows.d/x.jsonl", None, "rows.d/x.jsonl: skipped, cannot be read (Is a directory)"),
    ("rows.d/x.jsonl", b'{"key": "k9", "status": "ok", "job": [1]}\n', "skipping line 1: no str field 'task'"),
]


@pytest.mark.parametrize("name,content,warning", DAMAGED, ids=[f"{n}: {str(c)[:30]}" for n, c, _ in DAMAGED])
def test_status_of_a_folder_with_a_damaged_record_warns_and_reports(
    tmp_path, capsys, monkeypatch, recwarn, name, content, warning
):
    import socket

    monkeypatch.setenv("COLUMNS", "200")
    keys = ["k1", "k2"]
    for key in keys:
        store.append_row(tmp_path / store.ROWS, {**ROW, "key": key, "job": "7"})
    (tmp_path / store.RUN).write_text(json.dumps({"cells": [{**ROW, "key": key} for key in keys]}))
    target = tmp_path / name
    if target.is_file():
        target.unlink()
    target.parent.mkdir(exist_ok=True)
    if content is None:
        target.mkdir()
    else:
        target.write_bytes(content.replace(b"{host}", socket.gethostname().encode()))
    assert main(["status", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "2 cells of the latest sweep" in out and "2 done" in out, out
    assert err == "", err  # pytest records the warnings that the command line prints, one line each
    messages = [str(w.message) for w in recwarn]
    if warning:
        assert len(messages) == 1 and warning in messages[0], messages
    else:
        assert not messages, messages
    assert all("\n" not in m for m in messages)


def test_a_report_of_a_folder_whose_name_has_nothing_safe_gets_its_own_folder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "@@@"
    assert (
        main(
            [
                *_run(
                    "--estimators",
                    "full",
                    "--targets",
                    "latent",
                    "--iters",
                    "0",
                    "--rounds",
                    "1",
                    "--warmup",
                    "0",
                    "--no-memory",
                ),
                "--out",
                str(run),
            ]
        )
        == 0
    )
    monkeypatch.chdir(tmp_path)
    assert main(["report", "@@@"]) == 0
    assert not (tmp_path / "reports" / "index.md").exists()
    (page,) = (tmp_path / "reports").glob("*/index.md")
    assert page.parent.name.startswith("run-")


def test_there_are_at_least_forty_and_every_subcommand_is_covered():
    assert len(BAD) >= 40
    assert {argv[0] for argv, _ in BAD if argv} >= {"run", "report", "compare", "figures", "list", "check"}
