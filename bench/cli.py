"""python -m bench {list,run,report,compare,figures,check}: the command line. Bad input is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

from bench.errors import SpecError
from bench.options import split_list

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        choice = re.match(r"argument (\S+): invalid choice: '(.*?)' \(choose from (.*)\)", message)
        if choice:
            valid = [c.strip(" '") for c in choice.group(3).split(",")]
            close = difflib.get_close_matches(choice.group(2), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = f"unknown {choice.group(1)} {choice.group(2)!r}; {hint}valid: {', '.join(valid)}"
        raise SpecError(message)


def _remeasure_arg(text: str) -> frozenset:
    from bench.plan import REMEASURED

    chosen = frozenset(split_list(text))
    if not chosen or not chosen <= set(REMEASURED):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of {', '.join(REMEASURED)}")
    return chosen


def _folder_arg(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bench", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    lister = sub.add_parser("list", help="estimators (with options), tasks, samplers and targets")
    lister.add_argument("name", nargs="?", help="an estimator, task or sampler: show its documentation")
    lister.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="FILE.py",
        help="import a file that registers estimators or tasks",
    )

    run = sub.add_parser("run", help="run a sweep and write DIR/rows.jsonl and DIR/run.json")
    _run_flags(run)

    report = sub.add_parser("report", help="Markdown + HTML page with tables and plots of a run folder")
    report.add_argument("run_dir", type=_folder_arg, metavar="DIR", help="a run folder (holds rows.jsonl)")
    report.add_argument("--out", type=_folder_arg, default=None, help="output folder (default: reports/<run name>)")
    report.add_argument("--svg", action="store_true", help="write SVG next to each PNG")

    compare = sub.add_parser("compare", help="per-cell ratios B / A of two run folders, changes flagged")
    compare.add_argument("run_a", type=_folder_arg, metavar="DIR_A")
    compare.add_argument("run_b", type=_folder_arg, metavar="DIR_B")
    compare.add_argument(
        "--factor",
        type=float,
        default=1.1,
        help="flag ratios beyond this factor (default 1.1), if the spread does not explain them",
    )
    compare.add_argument("--only-changed", action="store_true", help="show flagged cells only")
    compare.add_argument(
        "--strict", action="store_true", help="exit 1 if any cell got slower, larger or changed its gradient"
    )

    check = sub.add_parser("check", help="the conformance suite: estimators against the contract on the toy")
    check.add_argument("estimators", nargs="*", metavar="SPEC", help="estimator specs (default: all registered)")
    check.add_argument(
        "--include", action="append", default=[], metavar="FILE.py", help="import a file that registers estimators"
    )
    check.add_argument(
        "--on",
        action="append",
        default=None,
        metavar="TASK",
        help="the estimator suite's tasks (default: toy[d=3,batch=6] and its eta=1.0 twin): a "
        "deterministic task spec first, then one with injected noise",
    )
    check.add_argument(
        "--samplers",
        nargs="*",
        default=None,
        metavar="SPEC",
        help="run the sampler suite instead (bench/check/samplers.py): these specs, or with none "
        "every registered sampler and its variants",
    )
    check.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        metavar="SPEC",
        help="run the task suite instead (bench/check/tasks.py): these specs, or with none every "
        "registered task with its defaults",
    )

    figures = sub.add_parser("figures", help="redraw the papers' figures from reference results (reports/figures)")
    figures.add_argument("--only", default="", help="comma-separated figure names (spec file stems)")
    figures.add_argument(
        "--specs", type=_folder_arg, default=None, help="folder of figure specs (default: reports/figures)"
    )
    figures.add_argument("--out", type=_folder_arg, default=None, help="output folder (default: the specs folder)")

    status = sub.add_parser("status", help="cells of a run folder: done, failed, running, queued, pending; its jobs")
    status.add_argument("run_dir", type=_folder_arg, metavar="DIR", help="a run folder")
    return parser


def _run_flags(run: argparse.ArgumentParser) -> None:
    """The run command's flags. Those of the sweep's settings are generated from their declarations
    (bench/settings.py); each defaults to None (not given): the sweep's settings come from the
    declared defaults, then --config's file, then the flags given (bench/sweepfile.py)."""
    from bench import settings
    from bench.launch import LAUNCHERS, LaunchSpec

    launch = LaunchSpec()
    run.add_argument(
        "--config",
        type=_folder_arg,
        default=None,
        metavar="SWEEP.toml",
        help="read the sweep from a file; the flags given here override it (README: Sweeps as data)",
    )
    settings.add_flags(run)
    flag = run.add_argument
    flag(
        "--out",
        type=_folder_arg,
        help="run folder (default: the sweep file's out, else results/<a name derived from the sweep>)",
    )
    flag("--force", action="store_true", default=False, help="rerun cells that already have a row")
    flag(
        "--remeasure",
        type=_remeasure_arg,
        default=frozenset(),
        metavar="time,memory",
        help="measure the time and/or memory of cells whose row is ok again, keeping their gradients, "
        "optimisation and evaluation (the harness's code is in no cell key; README: What a cell's key covers)",
    )
    flag("--no-progress", action="store_true", default=False, help="no progress bar")
    jobs = run.add_argument_group("launcher (where the cells run; a sweep file's [launcher] table)")
    jobs.add_argument("--launcher", help="; ".join(f"{k}: {v.help}" for k, v in LAUNCHERS.items()))
    jobs.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    jobs.add_argument(
        "--time-min",
        dest="time_min",
        type=int,
        metavar="MINUTES",
        help=f"time limit of one job (default: {launch.time_min}); a job past it is killed and its "
        "unfinished cell reruns with the same command",
    )
    jobs.add_argument("--gpus-per-job", dest="gpus_per_job", type=int, metavar="N", help="GPUs per job (default: 0)")
    jobs.add_argument(
        "--cpus-per-job",
        dest="cpus_per_job",
        type=int,
        metavar="N",
        help="CPU cores per job (default: --threads if given, else 1 on a CPU and 4 on CUDA)",
    )
    jobs.add_argument(
        "--array-parallelism",
        dest="array_parallelism",
        type=int,
        metavar="N",
        help="jobs running at once (default: SLURM's; submitit-local: the cores / cpus per job)",
    )
    jobs.add_argument(
        "--cells-per-job",
        dest="cells_per_job",
        type=int,
        metavar="N",
        help="cells per job (default 0: one point's cells, timed side by side)",
    )
    jobs.add_argument(
        "--sbatch",
        action="append",
        metavar="KEY=VALUE",
        help="an extra sbatch parameter, repeatable (e.g. --sbatch account=mylab --sbatch qos=high)",
    )
    jobs.add_argument(
        "--detach",
        action="store_const",
        const=True,
        help="submit the jobs and return; watch with `python -m bench status DIR`",
    )


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning  # a skipped row line is news, not a stack frame
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command == "list":
            return _list(args)
        if args.command == "report":
            return _report(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "figures":
            return _figures(args)
        if args.command == "check":
            return _check(args)
        if args.command == "status":
            return _status(args)
        return _run(args, argv)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed cells are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.problem import TARGET_INFO
    from bench.registry import ESTIMATORS, TASKS, include

    for path in args.include:
        include(path)
    console = Console()
    if args.name:
        return _describe(args.name, console)
    from bench.samplers import SAMPLERS

    console.print(
        _class_table(
            "Estimators",
            ESTIMATORS,
            ("exact", "options (type = default)", "what it does"),
            lambda cls: (_exactness(cls), _options(cls), cls.summary),
        )
    )
    console.print(
        _class_table(
            "Tasks",
            TASKS,
            ("options (type = default)", "targets", "what it is"),
            lambda cls: (_options(cls), ", ".join(cls.targets), cls.summary),
        )
    )
    console.print(
        _class_table(
            "Samplers (a task's sampler=NAME\\[k=v])",
            SAMPLERS,
            ("options (type = default)", "model", "what it is"),
            lambda cls: (_options(cls), cls.prediction, cls.summary),
        )
    )
    from bench.rewards import REWARDS

    table = Table(title="Rewards (a task's reward=NAME: those of its domain, or module:function / file.py:function)")
    table.add_column("name", no_wrap=True)
    table.add_column("domain", no_wrap=True)
    table.add_column("what it is")
    for reward in REWARDS.listing():
        table.add_row(reward.name, reward.domain, reward.description)
    console.print(table)
    table = Table(title="Targets")
    table.add_column("name")
    table.add_column("what is optimised")
    for name, text in ((t.name, t.help) for t in TARGET_INFO.values()):
        table.add_row(name, text)
    console.print(table)
    return 0


def _exactness(cls) -> str:
    """yes, no, or "some options" where `exact` is a property of the options (adjoint)."""
    if isinstance(cls.exact, property):
        return "some options"
    return "yes" if cls.exact else "no"


def _options(cls) -> str:
    return "\n".join(opt.describe() for opt in cls.options) or "-"


def _class_table(title: str, registry, columns: tuple[str, ...], cells):
    """One row per registered class: its name, then cells(cls) under `columns`."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("name", *columns):
        table.add_column(column, no_wrap=column in ("name", "exact"))
    for name in registry.names():
        table.add_row(name, *cells(registry.get(name)))
    return table


def _describe(name: str, console) -> int:
    import inspect

    from rich.markup import escape

    from bench.registry import ESTIMATORS, TASKS, origin
    from bench.samplers import SAMPLERS

    registry = TASKS if name in TASKS.names() else SAMPLERS if name in SAMPLERS.names() else ESTIMATORS
    cls = registry.get(name)
    console.print(f"[bold]{registry.kind} {escape(cls.name)}[/]  ({escape(origin(cls))})")
    doc = inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""
    console.print(escape(doc), soft_wrap=True)
    console.print("\n[bold]options[/]" if cls.options else "\nno options")
    for opt in cls.options:
        console.print(f"  {escape(opt.describe())}  [dim]{escape(opt.help)}[/]", soft_wrap=True)
    return 0


LAUNCH_FLAGS = (
    "launcher",
    "partition",
    "time_min",
    "gpus_per_job",
    "cpus_per_job",
    "array_parallelism",
    "cells_per_job",
    "sbatch",
    "detach",
)


def sweep_of(args: argparse.Namespace):
    """The sweep an invocation names: SweepSpec's defaults, --config's file, the flags given."""
    from bench import settings
    from bench.launch import parse_sbatch
    from bench.sweepfile import build, coerce

    flags = {}
    for setting in settings.SETTINGS:
        value = getattr(args, setting.name, None)
        if value is not None:
            flags[setting.name] = coerce(setting.name, value, setting.flag)
    launch = {name: getattr(args, name) for name in LAUNCH_FLAGS if getattr(args, name) is not None}
    if "sbatch" in launch:
        launch["sbatch"] = parse_sbatch(launch["sbatch"])
    sweep = build(args.config, flags, launch, args.out)
    for part in sweep.parts:  # include paths, the file's and the flags', are relative to the current directory
        part.includes = [str(Path(p).resolve()) for p in part.includes]
    if sweep.out is None:
        sweep.out = Path("results") / _default_name(sweep.parts[0])
    return sweep


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.execute import execute
    from bench.summary import print_summary

    sweep = sweep_of(args)
    out = sweep.out
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
    )
    bar = None

    def on_event(event) -> None:
        nonlocal bar
        if event.kind == "start":
            total, reused = event["total"], event["reused"]
            if reused:
                console.print(f"{reused} of {total} cells already have rows in {out}; skipping them (--force reruns)")
            if args.remeasure:
                console.print(
                    f"measuring {' and '.join(sorted(args.remeasure))} again of the cells whose row is ok; "
                    "their gradients, optimisation and evaluation are kept"
                )
            bar = progress.add_task("sweep", total=total, completed=reused)
            progress.start()  # only once the whole sweep has been checked
        elif event.kind == "point":
            cells = event["cells"]
            cell = cells[0]
            what = cell.estimator.spec if len(cells) == 1 else f"{len(cells)} estimators"
            progress.update(
                bar, description=escape(f"{cell.task.spec} {cell.target} N={cell.steps} seed={cell.seed}: {what}")
            )
        elif event.kind == "progress":
            progress.update(bar, completed=event["completed"])
        elif event.kind == "row":
            row = event["row"]
            if row["status"] not in ("ok", "skipped"):
                progress.console.print(
                    f"[yellow]{row['status']}[/]: "
                    + escape(f"{row['estimator']} {row['target']} N={row['steps']}: {row.get('error', '')}")
                )
        elif event.kind == "note":
            console.print(escape(event["text"]))
        elif event.kind == "warning" and event["reason"] == "job-failed":
            console.print(f"[red]{escape(event['text'])}[/]")
        elif event.kind == "warning" and event["reason"] == "missing":
            head = f"{event['count']} cell(s) got no row"
            console.print(f"[yellow]{head}[/]{escape(event['text'][len(head) :])}")
        elif event.kind == "warning":
            warnings.warn(event["text"], stacklevel=2)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            rows = execute(
                sweep.parts,
                out,
                sweep.launch,
                force=args.force,
                argv=argv,
                extra={"launcher": sweep.launch.options(), "config": sweep.source},
                remeasure=args.remeasure,
                on_event=on_event,
            )
        finally:
            if bar is not None:  # stopping a bar that never started prints a stray newline
                progress.stop()
    if rows is None:  # detached, or stopped waiting for the jobs
        return 0
    if rows:
        print_summary(rows, Console())
    Console().print(f"rows: {out}   status: python -m bench status {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from bench.report import write_report
    from bench.store import writable_folder

    if args.out is not None:  # a bad --out is reported before the run folder is read
        writable_folder(args.out)
    out = write_report(args.run_dir, args.out, formats=("png", "svg") if args.svg else ("png",))
    print(f"report: {out / 'index.md'}  {out / 'index.html'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bench.compare import compare, print_comparison

    table = compare(args.run_a, args.run_b, args.factor)
    print_comparison(table, Console(), args.only_changed)
    worse = table["flags"].str.contains("slower|larger|gradient", regex=True)
    return 1 if args.strict and worse.any() else 0


def _check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bench.registry import include

    for path in args.include:
        include(path)
    if args.samplers is not None:
        from bench.check.samplers import check_all_samplers, print_sampler_checks

        checks = check_all_samplers(args.samplers or None)
        print_sampler_checks(checks, Console())
    elif args.tasks is not None:
        from bench.check.tasks import check_all_tasks, print_task_checks

        checks = check_all_tasks(args.tasks or None)
        print_task_checks(checks, Console())
    else:
        from bench.conformance import check_all, print_checks

        checks = check_all(args.estimators or None, args.on)
        print_checks(checks, Console())
    return 1 if any(c.status == "fail" for c in checks) else 0


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bench.status import print_status, status

    print_status(status(args.run_dir), Console())
    return 0


def _figures(args: argparse.Namespace) -> int:
    from bench.figures import FIGURES, render_all

    if args.specs is not None and not _is_folder(args.specs):
        raise SpecError(f"--specs {args.specs} is not a folder of figure specs")

    results = render_all(args.specs or FIGURES, args.out, split_list(args.only) or None)
    for result in results:
        print(f"{result['name']}: {', '.join(result['files'])}")
    return 0


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name longer than the filesystem allows
        return False


def _default_name(spec) -> str:
    text = json.dumps(
        [spec.tasks, spec.estimators, spec.targets, spec.steps, spec.seeds, spec.iters, spec.device], sort_keys=True
    )
    tasks = "-".join(t.split("[")[0] for t in spec.tasks)
    return f"{tasks}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
