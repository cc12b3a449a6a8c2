"""ShortFT's shortcut on digits (arXiv 2507.22604): a few-step, trajectory-preserving student.

The student is the digits U-Net plus a distilled weight delta (frozen; shipped in
weights/shortcut/k<K>.safetensors). Its K-step DDIM chain, on the task's own scheduler and with
the task's guidance, maps the teacher's long-chain state at grid point i to the teacher's state at
grid point i - 1: the teacher runs K·M DDIM steps (M per student step) on the same scheduler, whose
grid contains the student's. So the student's chain preserves the teacher's trajectory, and a
reward LoRA (or conditioning, or x_N) tuned through the short chain is the long model's: the
student's weights are the long model's, trainable parameters included, plus the frozen delta.

    python -m tasks.digits.shortcut --steps 4      # distil, check, write weights/shortcut/k4.*

The check (written beside the weights, in training.json): from fresh noise, the student's K-step
samples against the teacher's K·M-step samples (mean absolute error per pixel, images in [-1, 1]),
and how often the classifier recognises the conditioned class in each.

The transformer's student (`digits[model=transformer]`) is the generic one (tasks/shortcut), in
the repo's student format in weights/transformer/shortcut/, distilled on the task's own problem:

    python -m tasks.shortcut --task 'digits[model=transformer]' --steps 4 --out tasks/digits/weights/transformer/shortcut"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bench.chain import Chain
from bench.errors import SpecError
from tasks.digits import paths
from tasks.digits.model import NULL_CLASS, GuidedDenoiser
from tasks.shortcut import Student
from tasks.shortcut import student_chain as generic_chain
from tasks.shortcut.sources import DELTA, RECORD

FOLDER = "shortcut"
TRANSFORMER_FOLDER = "transformer/shortcut"  # the transformer's student, in the repo's student format
# the options a transformer student was distilled at that its chain depends on
DISTILLED_AT = ("guidance", "cls", "sampler", "eta")
SEGMENT = 10  # teacher steps per student step (M)
GUIDANCE = 2.0  # the guidance the shipped students were distilled at (the task's default)


def weights_path(folder: Path, steps: int) -> Path:
    return folder / FOLDER / f"k{steps}.safetensors"


def shipped_steps(folder: Path | None) -> list[int]:
    """The student step counts with weights in `folder`."""
    if folder is None:
        return []
    return sorted(int(p.stem[1:]) for p in (folder / FOLDER).glob("k*.safetensors") if p.stem[1:].isdigit())


def load_delta(folder: Path, steps: int) -> tuple[dict[str, Tensor], dict]:
    """The student's weight delta (by the U-Net's parameter names) and its record."""
    path = weights_path(folder, steps)
    if not path.exists():
        valid = ", ".join(map(str, shipped_steps(folder))) or "none"
        raise SpecError(
            f"no distilled {steps}-step student in {folder / FOLDER} (shipped: steps={valid}; "
            f"distil one with python -m tasks.digits.shortcut --steps {steps})"
        )
    meta = json.loads(path.with_suffix(".json").read_text())
    return load_file(path), meta


def transformer_record(folder: Path | None) -> dict | None:
    """The record (student.json) of the transformer's student in `folder`, if there is one."""
    if folder is None or not (folder / TRANSFORMER_FOLDER / RECORD).is_file():
        return None
    return json.loads((folder / TRANSFORMER_FOLDER / RECORD).read_text())


def offered_steps(folder: Path | None, model: str) -> list[int]:
    """The student step counts `model` has in `folder`: the epsilon model's files, the transformer's one."""
    if model == "epsilon":
        return shipped_steps(folder)
    record = transformer_record(folder) if model == "transformer" else None
    return [record["steps"]] if record else []


def applies(task) -> bool:
    """Whether the task's chain is the one its students follow: the epsilon model's deterministic
    DDIM at GUIDANCE, or the transformer's chain at the options its student was distilled at."""
    if task.model == "epsilon":
        return task.chosen_sampler().name == "ddim" and task.eta == 0 and task.guidance == GUIDANCE
    record = transformer_record(task._folder()) if task.model == "transformer" else None
    return record is not None and all(task.values[k] == record["options"].get(k) for k in DISTILLED_AT)


def student_chain(task, problem, steps: int) -> Chain:
    """The K-step chain of the student built on `problem`'s denoiser, counted with the problem's chain."""
    folder = task._folder()
    if task.model == "transformer":
        delta = {k: v.float() for k, v in load_file(folder / TRANSFORMER_FOLDER / DELTA).items()}
        return generic_chain(problem, delta, task.make_schedule(steps), "digits' transformer student")
    delta, meta = load_delta(folder, steps)
    return generic_chain(problem, delta, task.make_schedule(steps), "digits' student")


def _teacher_grid(task, steps: int, segment: int):
    short, long = task.make_schedule(steps), task.make_schedule(steps * segment)
    picked = long.timesteps[segment - 1 :: segment]
    if tuple(picked) != tuple(short.timesteps):
        raise SpecError(
            f"the {steps * segment}-step grid does not contain the {steps}-step grid "
            f"({picked} against {short.timesteps}); choose another --segment"
        )
    return short, long


def _teacher(task) -> GuidedDenoiser:
    """The digits model with the guidance the students are distilled at."""
    return GuidedDenoiser(task.unet, task.embeddings[NULL_CLASS], GUIDANCE)


@torch.no_grad()
def trajectories(task, denoiser: nn.Module, steps: int, segment: int, noise: Tensor, cond: Tensor) -> Tensor:
    """The teacher's states at the student's grid points: (K + 1, B, ...), x_N first."""
    _, long = _teacher_grid(task, steps, segment)
    _, states = Chain(denoiser, long).sample(noise, cond, keep_states=True)
    return torch.stack(states[::segment])


def distil(
    task,
    steps: int,
    segment: int = SEGMENT,
    per_class: int = 128,
    train_steps: int = 1000,
    batch: int = 128,
    lr: float = 5e-4,
    seed: int = 0,
    log=print,
) -> tuple[dict[str, Tensor], dict]:
    """Fit the delta so that each student step lands where the teacher's M steps land (the loss is
    taken on the student's epsilon, eps* = (x_target - a_i x_i) / b_i, so segments weigh alike)."""
    torch.manual_seed(seed)
    short, _ = _teacher_grid(task, steps, segment)
    teacher = _teacher(task)
    labels = torch.arange(10).repeat_interleave(per_class)
    conds = task.embeddings[labels]
    noise = torch.randn(len(labels), 1, 8, 8)
    started = time.perf_counter()
    states = torch.cat(
        [
            trajectories(task, teacher, steps, segment, noise[i : i + 512], conds[i : i + 512])
            for i in range(0, len(labels), 512)
        ],
        dim=1,
    )  # (K + 1, B, 1, 8, 8)
    log(f"teacher: {len(labels)} trajectories of {steps * segment} steps in {time.perf_counter() - started:.0f} s")
    student_unet = type(task.unet).from_config(task.unet.config)
    student_unet.load_state_dict(task.unet.state_dict())
    student_unet.train().requires_grad_(True)
    student = GuidedDenoiser(student_unet, task.embeddings[NULL_CLASS], GUIDANCE)
    optimiser = torch.optim.Adam(student_unet.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, train_steps)
    coeffs = [short.coefficients(i) for i in range(1, steps + 1)]  # (a_i, b_i, s_i) for i = 1..K
    if any(abs(b) < 1e-6 for _, b, _ in coeffs):
        raise SpecError(f"the {steps}-step grid has an identity step (b_i = 0): no student step to distil")
    losses = []
    for it in range(train_steps):
        pick = torch.randint(len(labels), (batch,))
        i = torch.randint(1, steps + 1, (batch,))  # the student step: from grid point i to i - 1
        x = states[steps - i, pick]
        target = states[steps - i + 1, pick]
        a = torch.tensor([coeffs[k - 1][0] for k in i.tolist()]).view(-1, 1, 1, 1)
        b = torch.tensor([coeffs[k - 1][1] for k in i.tolist()]).view(-1, 1, 1, 1)
        t = torch.tensor([short.model_time(k) for k in i.tolist()], dtype=torch.float32)
        eps_star = (target - a * x) / b
        loss = ((student(x, t, conds[pick]) - eps_star) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (it + 1) % 200 == 0:
            log(f"step {it + 1}/{train_steps}: loss {sum(losses[-200:]) / 200:.5f}")
    teacher_params = dict(task.unet.named_parameters())
    delta = {
        name: (value.detach() - teacher_params[name]).contiguous() for name, value in student_unet.named_parameters()
    }
    info = {
        "steps": steps,
        "segment": segment,
        "teacher_steps": steps * segment,
        "guidance": GUIDANCE,
        "trajectories": len(labels),
        "train_steps": train_steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "final_loss_mean_last_200": sum(losses[-200:]) / min(200, len(losses)),
        "seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    return delta, info


@torch.no_grad()
def check(
    task, delta: dict[str, Tensor], steps: int, segment: int = SEGMENT, per_class: int = 100, seed: int = 1
) -> dict:
    """Student against teacher from the same fresh noise: per-pixel error and recognition."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 1, 8, 8, generator=generator)
    conds = task.embeddings[labels]
    teacher = _teacher(task)
    _, long = _teacher_grid(task, steps, segment)
    short = task.make_schedule(steps)
    x_teacher = Chain(teacher, long).sample(noise, conds)
    x_student = Chain(Student(teacher, delta), short).sample(noise, conds)
    x_plain = Chain(teacher, short).sample(noise, conds)  # the teacher's own K steps, for scale

    def recognised(x: Tensor) -> float:
        return float((task.classifier(x).argmax(-1) == labels).float().mean())

    return {
        "samples": len(labels),
        "teacher_steps": long.num_steps,
        "student_mae": float((x_student - x_teacher).abs().mean()),
        "teacher_k_steps_mae": float((x_plain - x_teacher).abs().mean()),
        "student_recognised": recognised(x_student),
        "teacher_recognised": recognised(x_teacher),
        "teacher_k_steps_recognised": recognised(x_plain),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.registry import TASKS  # the task by name: this module is part of it, not above it
    from tasks.digits.train import record

    parser = argparse.ArgumentParser(
        prog="python -m tasks.digits.shortcut",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=4, help="the student's step count K")
    parser.add_argument("--segment", type=int, default=SEGMENT, help="teacher steps per student step M")
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=128, help="teacher trajectories per class")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=paths.COMMITTED, help="the digits weights folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = TASKS.create("digits")
    task.setup(torch.device("cpu"))
    delta, info = distil(
        task, args.steps, args.segment, per_class=args.per_class, train_steps=args.train_steps, batch=args.batch
    )
    info["check"] = check(task, delta, args.steps, args.segment)
    path = weights_path(args.out, args.steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(delta, path)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    record(args.out, f"shortcut-k{args.steps}", info)
    print(json.dumps(info["check"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
