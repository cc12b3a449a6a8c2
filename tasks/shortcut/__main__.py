"""python -m tasks.shortcut --task SPEC --steps K --out FOLDER: distil a K-step student of the
task's model (tasks/shortcut/distil.py) and write it in the repo's format, student.safetensors and
student.json, which the task's `student` option reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.errors import SpecError
from bench.options import parse_spec
from tasks.shortcut.distil import SEGMENT, distil, write


def make_task(spec: str, batch: int | None):
    """The task of `spec`, set up on the CPU, with `batch` samples per problem where given."""
    from bench.registry import TASKS

    name, values = parse_spec(spec)
    if batch is not None:
        values = {**values, "batch": batch}
    task = TASKS.get(name)(**values)
    task.preflight()
    task.setup(torch.device("cpu"))
    return task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.shortcut", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, help="the teacher's task spec, e.g. 'sd[model=tiny]'")
    parser.add_argument("--steps", type=int, required=True, help="the student's step count K")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--segment", type=int, default=SEGMENT, help="teacher steps per student step M")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--trajectories", type=int, default=64, help="teacher trajectories from fresh noise")
    parser.add_argument("--batch", type=int, default=None, help="samples per training step (the task's batch)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.steps < 1 or args.segment < 1 or args.train_steps < 1:
            raise SpecError("--steps, --segment and --train-steps must be >= 1")
        task = make_task(args.task, args.batch)
        delta, record = distil(task, args.steps, args.segment, args.train_steps, args.trajectories, args.lr, args.seed)
    except SpecError as exc:
        parser.exit(2, f"error: {exc}\n")
    write(args.out, delta, record)
    print(json.dumps(record["check"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
