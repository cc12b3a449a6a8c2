"""The commands of `python -m bench`: main parses (bench/cli/parser.py) and hands each command to
its function here. Bad input is one line on stderr and exit 2, an internal error one line and exit 1."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import warnings
from pathlib import Path

from bench.cli.parser import build_parser
from bench.errors import SpecError
from bench.options import split_list

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time


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
        if args.command == "plan":
            return _plan(args)
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
            lambda cls: (exactness(cls), _options(cls), cls.summary),
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


def documentation(cls) -> str:
    """What `list NAME` prints and the docs' page shows: the module's docstring, else the class's."""
    return inspect.getdoc(sys.modules[cls.__module__]) or inspect.getdoc(cls) or ""


def exactness(cls) -> str:
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

    from rich.markup import escape

    from bench.registry import ESTIMATORS, TASKS, origin
    from bench.samplers import SAMPLERS

    registry = TASKS if name in TASKS.names() else SAMPLERS if name in SAMPLERS.names() else ESTIMATORS
    cls = registry.get(name)
    console.print(f"[bold]{registry.kind} {escape(cls.name)}[/]  ({escape(origin(cls))})")
    doc = documentation(cls)
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
    from bench.run import settings
    from bench.run.launch import parse_sbatch
    from bench.run.sweepfile import build, coerce

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

    from bench.run.execute import execute
    from bench.results.summary import print_summary

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
    from bench.results.report import write_report
    from bench.results.store import writable_folder

    if args.out is not None:  # a bad --out is reported before the run folder is read
        writable_folder(args.out)
    out = write_report(args.run_dir, args.out, formats=("png", "svg") if args.svg else ("png",))
    print(f"report: {out / 'index.md'}  {out / 'index.html'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bench.results.compare import compare, print_comparison

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
        from bench.check.estimators import check_all, print_checks

        checks = check_all(args.estimators or None, args.on)
        print_checks(checks, Console())
    return 1 if any(c.status == "fail" for c in checks) else 0


def _plan(args: argparse.Namespace) -> int:
    import torch

    from bench.planner.models import architecture
    from bench.planner.table import TARGETS, PlanSpec, parse_bytes, plan_rows, plan_units, render
    from bench.planner.timed import check_dtype, measure_units, present_device
    from bench.registry import ESTIMATORS, include

    for path in args.include:
        include(path)
    arch = architecture(args.model)
    memory = parse_bytes(args.device_memory) if args.device_memory else None
    if memory is None and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
    estimators = split_list(args.estimators) or None
    for spec in estimators or ():
        ESTIMATORS.create(spec)  # a typo is one line with "did you mean"
    spec = PlanSpec(
        arch,
        arch.default_resolution if args.resolution is None else args.resolution,
        arch.default_steps if args.steps is None else args.steps,
        batch=args.batch,
        dtype=args.dtype,
        target=args.target,
        rank=args.rank,
        guidance=args.guidance,
        checkpoint_blocks=args.checkpoint_blocks,
        vae_in_backward=args.vae_in_backward,
        device_memory=memory,
        tflops=args.tflops,
    )
    spec.check()
    if args.gate_pattern is not None and not args.gates:
        raise SpecError("--gate-pattern needs --gates")
    device = present_device()
    check_dtype(spec.dtype, device)  # a GPU that cannot run bf16 refuses it, measured or not
    unit = plan_units(spec)
    measured = None
    if args.measure:
        measured = measure_units(
            spec.guided_arch, spec.resolution, spec.batch, spec.dtype, TARGETS[spec.target], spec.rank, device
        )
    rows = plan_rows(spec, unit, estimators, measured)
    print(render(spec, unit, rows, memory_label=args.device_memory or "", measured=measured))
    if args.gates:
        from bench.planner import gates

        print()
        print(gates.render(arch, spec.resolution, spec.steps, spec.batch, spec.dtype, args.gate_pattern))
    return 0


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bench.results.status import print_status, status

    print_status(status(args.run_dir), Console())
    return 0


def _figures(args: argparse.Namespace) -> int:
    from bench.results.figures import FIGURES, render_all

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
