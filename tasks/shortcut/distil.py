"""The repo's own distillation of a K-step student, on any task (ShortFT's trajectory-preserving
shortcut, arXiv 2507.22604).

The teacher is the task's own problem at N = K·M steps, `task.make_problem("latent", K·M, seed)`:
its guided denoiser, at the task's guidance, with its conditioning, on its sampler. It runs from
fresh noise, and its states at the noise levels of the student's grid points are kept (the K-step
grid must lie on the K·M-step one). Every weight of the denoising network is then fitted so that
each student step, from the teacher's state at grid point j, lands where the teacher's steps land
at j - 1. The steps are affine, x_{j-1} = a_j x_j + b_j out_j, so the loss is taken on the
network's output against the one that lands exactly, out* = (x_target - a_j x_j) / b_j: the
error of the landing scaled by 1 / b_j, so that short and long steps weigh alike. Only
single-step deterministic samplers have such a step (ddim at eta 0, flow-euler)."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from bench.chain import Schedule
from bench.errors import SpecError
from tasks.shortcut.check import shared_points, trajectory_error
from tasks.shortcut.sources import DELTA, RECORD
from tasks.shortcut.student import denoising_network, student_chain

SEGMENT = 10  # teacher steps per student step (M)
CHECK_SEED = 10_000  # the check's problem: a seed the training noise does not draw
STORED = torch.float16  # the delta on disk: half the bytes, rounding far below its own size


def check_sampler(schedule: Schedule, spec: str) -> None:
    """SpecError unless the sampler takes single affine deterministic steps (ddim, flow-euler)."""
    if not callable(getattr(schedule, "coefficients", None)) or schedule.history_size:
        raise SpecError(
            f"distilling on {spec}: sampler {schedule.sampler} does not take single affine steps; "
            "valid: ddim (eta 0), flow-euler"
        )
    if any(schedule.noise_std(i) > 0 for i in range(1, schedule.num_steps + 1)):
        raise SpecError(f"distilling on {spec}: its sampler injects noise (eta > 0); valid: eta 0")


def grid(task, steps: int, segment: int) -> tuple[Schedule, list[int]]:
    """The student's schedule and, for each of its states j < K, the teacher's state i at the same
    noise level; SpecError naming a segment that works where the K·M-step grid misses one."""
    short = task.make_schedule(steps)

    def points(m: int) -> list[int] | None:
        pairs = shared_points(short, task.make_schedule(steps * m))
        return [i for _, i in pairs] if len(pairs) == steps else None

    found = points(segment)
    if found is None:
        works = next((m for m in range(2, 65) if m != segment and points(m) is not None), None)
        hint = f"--segment {works} works" if works else "no segment up to 64 works"
        raise SpecError(
            f"distilling on {task.spec}: the {steps * segment}-step grid does not contain the {steps}-step grid; {hint}"
        )
    if any(short.is_identity(j) for j in range(1, steps + 1)):
        raise SpecError(f"distilling on {task.spec}: the {steps}-step grid has an identity step (b = 0)")
    return short, found


def coefficients(schedule: Schedule, j: int) -> tuple[float, float]:
    a, b, _ = schedule.coefficients(j)
    return a, b


@torch.no_grad()
def teacher_states(problem, points: list[int], groups: int, generator: torch.Generator) -> Tensor:
    """(groups, K + 1, B, ...): the teacher's states at the student's points j = 0..K, x_N at K."""
    n = problem.num_steps
    out = []
    for _ in range(groups):
        noise = torch.randn(problem.x_start.shape, generator=generator).to(problem.x_start)
        _, states = problem.chain.sample(noise, problem.cond, keep_states=True)  # x_i at [N - i]
        out.append(torch.stack([states[n - i] for i in points] + [noise]))
    return torch.stack(out)


def distil(
    task,
    steps: int,
    segment: int = SEGMENT,
    train_steps: int = 300,
    trajectories: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    log=print,
) -> tuple[dict[str, Tensor], dict]:
    """(the delta by the network's parameter names, its record) of a K-step student of the task's
    model; `trajectories` teacher trajectories in groups of the task's batch (its conditioning is
    per batch), one group per training step."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    teacher = task.make_problem("latent", steps * segment, seed)
    check_sampler(teacher.chain.schedule, task.spec)
    short, points = grid(task, steps, segment)
    check_sampler(short, task.spec)
    batch = teacher.x_start.shape[0]
    groups = max(1, math.ceil(trajectories / batch))
    generator = torch.Generator().manual_seed(2**20 + seed)
    states = teacher_states(teacher, points, groups, generator)
    log(f"teacher: {groups * batch} trajectories of {steps * segment} steps in {time.perf_counter() - started:.1f} s")

    student = copy.deepcopy(teacher.chain.denoiser)
    _, network = denoising_network(student)
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    network.requires_grad_(True)
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, train_steps)
    table = torch.tensor([coefficients(short, j) for j in range(1, steps + 1)], dtype=torch.float64)
    times = torch.tensor([short.model_time(j) for j in range(1, steps + 1)])
    shape = (batch,) + (1,) * (teacher.x_start.dim() - 1)
    rows = torch.arange(batch)
    losses = []
    for it in range(train_steps):
        group = int(torch.randint(groups, ()))
        j = torch.randint(1, steps + 1, (batch,))  # the student step of each sample: from j to j - 1
        x, target = states[group, j, rows], states[group, j - 1, rows]
        a, b = (table[j - 1, k].to(x).view(shape) for k in (0, 1))
        out = student(x, times[j - 1].to(x), teacher.cond)
        loss = ((out - (target - a * x) / b) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (it + 1) % 100 == 0:
            log(f"step {it + 1}/{train_steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.5g}")
    delta = {name: (p.detach() - before[name]).to(STORED).contiguous() for name, p in network.named_parameters()}
    seconds = time.perf_counter() - started
    record = {
        "steps": steps,
        "segment": segment,
        "teacher_steps": steps * segment,
        "sampler": teacher.chain.schedule.sampler,
        "guidance": getattr(task, "guidance", None),
        "task": task.spec,
        "options": task.values,
        "stored": str(STORED).removeprefix("torch."),
        "training": {
            "trajectories": groups * batch,
            "train_steps": train_steps,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "loss_first_100": sum(losses[:100]) / max(1, len(losses[:100])),
            "loss_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])),
            "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
        },
        "check": check(task, delta, steps, segment),
    }
    return delta, record


def check(task, delta: dict[str, Tensor], steps: int, segment: int = SEGMENT, seed: int = CHECK_SEED) -> dict:
    """The trajectory check (tasks/shortcut/check.py) on a problem the training did not see, at N = K·M."""
    problem = task.make_problem("latent", steps * segment, seed)
    chain = student_chain(problem, {k: v.float() for k, v in delta.items()}, task.make_schedule(steps))
    return {"teacher_steps": steps * segment, "seed": seed, **trajectory_error(problem, chain)}


def write(folder: Path, delta: dict[str, Tensor], record: dict) -> None:
    """The repo's student format: student.safetensors and student.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(delta, folder / DELTA)
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
