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


def _folder_arg(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder")
    return Path(text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in split_list(text)]
    except ValueError:
        raise SpecError(f"expected a comma-separated list of integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from bench.runner import (DEFAULT_ESTIMATORS, DEFAULT_STEPS, DEFAULT_TASK, DEFAULT_TIMEOUT_S, ISOLATE_MODES,
                              MEMORY_MODES)

    parser = _Parser(prog="python -m bench", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    lister = sub.add_parser("list", help="estimators (with options), tasks, samplers and targets")
    lister.add_argument("name", nargs="?", help="an estimator, task or sampler: show its documentation")
    lister.add_argument("--include", action="append", default=[], metavar="FILE.py",
                        help="import a file that registers estimators or tasks")

    run = sub.add_parser("run", help="run a sweep and write DIR/rows.jsonl and DIR/run.json")
    run.add_argument("--tasks", default=DEFAULT_TASK, help=f"comma-separated task specs (default: {DEFAULT_TASK})")
    run.add_argument("--estimators", default=DEFAULT_ESTIMATORS,
                     help=f"comma-separated estimator specs name[k=v,...] (default: {DEFAULT_ESTIMATORS})")
    run.add_argument("--targets", default="latent,cond,weights", help="latent, cond, weights (default), noise (needs eta > 0)")
    default_steps = ",".join(map(str, DEFAULT_STEPS))
    run.add_argument("--steps", default=default_steps, help=f"sampler step counts N (default: {default_steps})")
    run.add_argument("--seeds", default="0", help="seeds (default: 0)")
    run.add_argument("--iters", type=int, default=4, help="Adam iterations of the short optimisation")
    run.add_argument("--rounds", type=int, default=3,
                     help="clean timed rounds per cell at least (rounds slowed by other load are repeated)")
    run.add_argument("--stable", type=float, default=0.0, metavar="FRACTION",
                     help="keep timing until each cell's IQR is within FRACTION of its median, e.g. 0.05 "
                          "(0: off; capped by --timing-cap, default 300 s per point then)")
    run.add_argument("--timing-cap", type=float, default=0.0, metavar="SECONDS",
                     help="stop timing a point after SECONDS (0: no cap)")
    run.add_argument("--threads", type=int, default=0,
                     help="torch intra-op threads (0: 1 on a CPU, which a busy core cannot slow; torch's default on CUDA)")
    run.add_argument("--no-interleave", dest="interleave", action="store_false",
                     help="time each cell on its own instead of round-robin with the other estimators of its point")
    run.add_argument("--baseline", default="full", metavar="SPEC",
                     help="the estimator time ratios (with bootstrap intervals) are taken to (default: full)")
    run.add_argument("--warmup", type=int, default=1,
                     help="untimed calls of each cell right before its timed rounds (default 1; the untimed "
                          "agreement call runs earlier)")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--memory", default="auto", metavar="MODE",
                     help="peak-memory measurement: " + "; ".join(f"{k}: {v}" for k, v in MEMORY_MODES.items()))
    run.add_argument("--no-memory", action="store_true", help="same as --memory off")
    run.add_argument("--isolate", default="auto", metavar="MODE",
                     help="process per cell: " + "; ".join(f"{k}: {v}" for k, v in ISOLATE_MODES.items()))
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                     help=f"limit per cell; a cell over it is recorded as 'timeout' (0: none; default {DEFAULT_TIMEOUT_S:g})")
    run.add_argument("--out", type=_folder_arg, default=None,
                     help="run folder (default: results/<a name derived from the sweep>)")
    run.add_argument("--force", action="store_true", help="rerun cells already in rows.jsonl")
    run.add_argument("--include", action="append", default=[], metavar="FILE.py",
                     help="import a file that registers estimators or tasks")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser("report", help="Markdown + HTML page with tables and plots of a run folder")
    report.add_argument("run_dir", type=_folder_arg, metavar="DIR", help="a run folder (holds rows.jsonl)")
    report.add_argument("--out", type=_folder_arg, default=None, help="output folder (default: reports/<run name>)")
    report.add_argument("--svg", action="store_true", help="write SVG next to each PNG")

    compare = sub.add_parser("compare", help="per-cell ratios B / A of two run folders, changes flagged")
    compare.add_argument("run_a", type=_folder_arg, metavar="DIR_A")
    compare.add_argument("run_b", type=_folder_arg, metavar="DIR_B")
    compare.add_argument("--factor", type=float, default=1.1,
                         help="flag ratios beyond this factor (default 1.1), if the spread does not explain them")
    compare.add_argument("--only-changed", action="store_true", help="show flagged cells only")
    compare.add_argument("--strict", action="store_true", help="exit 1 if any cell got slower, larger or changed its gradient")

    check = sub.add_parser("check", help="the conformance suite: estimators against the contract on the toy")
    check.add_argument("estimators", nargs="*", metavar="SPEC", help="estimator specs (default: all registered)")
    check.add_argument("--include", action="append", default=[], metavar="FILE.py",
                       help="import a file that registers estimators")

    figures = sub.add_parser("figures", help="redraw the papers' figures from reference results (reports/figures)")
    figures.add_argument("--only", default="", help="comma-separated figure names (spec file stems)")
    figures.add_argument("--specs", type=_folder_arg, default=None, help="folder of figure specs (default: reports/figures)")
    figures.add_argument("--out", type=_folder_arg, default=None, help="output folder (default: the specs folder)")
    return parser


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
        return _run(args, argv)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed cells are saved; run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.problem import TARGET_HELP
    from bench.registry import ESTIMATORS, TASKS, include

    for path in args.include:
        include(path)
    console = Console()
    if args.name:
        return _describe(args.name, console)
    from bench.samplers import SAMPLERS

    console.print(_class_table("Estimators", ESTIMATORS, ("exact", "options (type = default)", "what it does"),
                               lambda cls: ("yes" if cls.exact else "no", _options(cls), cls.summary)))
    console.print(_class_table("Tasks", TASKS, ("options (type = default)", "targets", "what it is"),
                               lambda cls: (_options(cls), ", ".join(cls.targets), cls.summary)))
    console.print(_class_table("Samplers (a task's sampler=NAME\\[k=v])", SAMPLERS,
                               ("options (type = default)", "model", "what it is"),
                               lambda cls: (_options(cls), cls.prediction, cls.summary)))
    from tasks.sd import rewards

    table = Table(title="Rewards of the sd task (reward=NAME)")
    table.add_column("name", no_wrap=True)
    table.add_column("what it is")
    for name, text in rewards.DESCRIPTIONS.items():
        table.add_row(name, text)
    for name, target in rewards.plugin_rewards().items():
        table.add_row(name, f"plug-in: {target}")
    console.print(table)
    table = Table(title="Targets")
    table.add_column("name")
    table.add_column("what is optimised")
    for name, text in TARGET_HELP.items():
        table.add_row(name, text)
    console.print(table)
    return 0


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


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.runner import SweepSpec, run_sweep
    from bench.summary import print_summary

    spec = SweepSpec(
        tasks=split_list(args.tasks), estimators=split_list(args.estimators),
        targets=split_list(args.targets), steps=_int_list(args.steps), seeds=_int_list(args.seeds),
        iters=args.iters, warmup=args.warmup, rounds=args.rounds,
        memory="off" if args.no_memory else args.memory, timeout=args.timeout or None,
        device=args.device, includes=[str(Path(p).resolve()) for p in args.include], isolate=args.isolate,
        threads=args.threads, interleave=args.interleave, baseline=args.baseline, stable=args.stable,
        timing_cap=args.timing_cap,
    )
    out = args.out or Path("results") / _default_name(spec)
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=args.no_progress)
    bar = None

    def on_start(total: int, reused: int) -> None:
        nonlocal bar
        if reused:
            console.print(f"{reused} of {total} cells already in {out / 'rows.jsonl'}; skipping them "
                          f"(--force reruns)")
        bar = progress.add_task("sweep", total=total, completed=reused)
        progress.start()  # only once the whole sweep has been checked

    def on_point(cells) -> None:
        cell = cells[0]
        what = cell.estimator.spec if len(cells) == 1 else f"{len(cells)} estimators"
        progress.update(bar, description=escape(f"{cell.task.spec} {cell.target} N={cell.steps} "
                                                f"seed={cell.seed}: {what}"))

    def on_row(row) -> None:
        progress.advance(bar)
        if row["status"] not in ("ok", "skipped"):
            progress.console.print(f"[yellow]{row['status']}[/]: " + escape(
                f"{row['estimator']} {row['target']} N={row['steps']}: {row.get('error', '')}"))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            rows = run_sweep(spec, out, force=args.force, argv=argv, on_start=on_start,
                             on_point=on_point, on_row=on_row)
        finally:
            if bar is not None:  # stopping a bar that never started prints a stray newline
                progress.stop()
    print_summary(rows, Console())
    Console().print(f"rows: {out / 'rows.jsonl'}   run: {out / 'run.json'}")
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

    from bench.conformance import check_all, print_checks
    from bench.registry import include

    for path in args.include:
        include(path)
    checks = check_all(args.estimators or None)
    print_checks(checks, Console())
    return 1 if any(c.status == "fail" for c in checks) else 0


def _figures(args: argparse.Namespace) -> int:
    from bench.figures import FIGURES, render_all

    if args.specs is not None and not args.specs.is_dir():
        raise SpecError(f"--specs {args.specs} is not a folder of figure specs")

    results = render_all(args.specs or FIGURES, args.out, split_list(args.only) or None)
    for result in results:
        print(f"{result['name']}: {', '.join(result['files'])}")
    return 0


def _default_name(spec) -> str:
    text = json.dumps([spec.tasks, spec.estimators, spec.targets, spec.steps, spec.seeds, spec.iters,
                       spec.device], sort_keys=True)
    tasks = "-".join(t.split("[")[0] for t in spec.tasks)
    return f"{tasks}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
