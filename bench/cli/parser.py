"""python -m bench {list,run,report,compare,figures,check,status,plan}: the command line. Bad input is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

from bench.errors import SpecError
from bench.options import split_list

DESCRIPTION = "gradient estimators through diffusion samplers: list, run, report, compare, figures, check, status, plan"


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
    from bench.run.plan import REMEASURED

    chosen = frozenset(split_list(text))
    if not chosen or not chosen <= set(REMEASURED):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of {', '.join(REMEASURED)}")
    return chosen


def _folder_arg(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a folder")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bench", description=DESCRIPTION)
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

    plan = sub.add_parser(
        "plan", help="every estimator's peak memory, FLOPs and time on a real architecture, without weights or a GPU"
    )
    plan.add_argument(
        "--model",
        required=True,
        help="sd1.5, sd2.1, sdxl, sd3.5-medium, sd3.5-large, flux.1-dev, "
        "flux.1-schnell, or a local model folder (only its config files are read)",
    )
    plan.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    plan.add_argument("--steps", type=int, default=None, help="sampler steps N (default: the model's usual)")
    plan.add_argument("--batch", type=int, default=1, help="samples per gradient (default 1)")
    plan.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    plan.add_argument("--target", default="lora", help="latent, cond, lora (default) or full")
    plan.add_argument("--rank", type=int, default=32, help="LoRA rank on the attention projections (default 32)")
    plan.add_argument(
        "--no-guidance",
        dest="guidance",
        action="store_false",
        help="no classifier-free guidance (it doubles the denoiser's batch where the model uses it)",
    )
    plan.add_argument(
        "--checkpoint-blocks", action="store_true", help="activation checkpointing inside the denoiser, per block"
    )
    plan.add_argument(
        "--no-vae",
        dest="vae_in_backward",
        action="store_false",
        help="the reward reads latents: no VAE decode in the backward",
    )
    plan.add_argument(
        "--device-memory",
        default=None,
        metavar="SIZE",
        help="say whether each fits, e.g. 24GiB, 80GB (default: the present GPU's, if any)",
    )
    plan.add_argument(
        "--tflops", type=float, default=400.0, help="sustained throughput the times assume, TFLOP/s (default 400)"
    )
    plan.add_argument(
        "--measure",
        action="store_true",
        help="times from F and V measured on the present device (CUDA if there, else this CPU), the "
        "denoiser and VAE built with random weights there (they must fit), instead of --tflops",
    )
    plan.add_argument(
        "--gates",
        action="store_true",
        help="also DiP-GO's gates: each gated block's share of a denoiser call and the operations of the "
        "static reuse patterns over N steps (FLOPs counted under fake tensors)",
    )
    plan.add_argument(
        "--gate-pattern",
        type=Path,
        default=None,
        metavar="FILE.json",
        help="with --gates: the operations of this pattern too (N - 1 rows of one 0/1 per block)",
    )
    plan.add_argument("--estimators", default="", help="comma-separated specs (default: every registered one)")
    plan.add_argument(
        "--include", action="append", default=[], metavar="FILE.py", help="import a file that registers estimators"
    )

    status = sub.add_parser("status", help="cells of a run folder: done, failed, running, queued, pending; its jobs")
    status.add_argument("run_dir", type=_folder_arg, metavar="DIR", help="a run folder")
    return parser


def _run_flags(run: argparse.ArgumentParser) -> None:
    """The run command's flags. Those of the sweep's settings are generated from their declarations
    (bench/run/settings.py); each defaults to None (not given): the sweep's settings come from the
    declared defaults, then --config's file, then the flags given (bench/run/sweepfile.py)."""
    from bench.run import settings
    from bench.run.launch import LAUNCHERS, LaunchSpec

    launch = LaunchSpec()
    run.add_argument(
        "--config",
        type=_folder_arg,
        default=None,
        metavar="SWEEP.toml",
        help="read the sweep from a file; the flags given here override it (docs/sweeps.md)",
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
        "optimisation and evaluation (the harness's code is in no cell key; docs/methodology.md: what a cell's key covers)",
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
