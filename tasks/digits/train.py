"""Train the digits models: `python -m tasks.digits.train [--what unet|flow|transformer|classifier|audit|all]`.

The U-Net is a DDPM (epsilon prediction, linear betas, 1000 steps), a second one of the same
architecture is a rectified-flow model (velocity prediction, `--what flow`), and the transformer
(an SD3 MMDiT, `--what transformer`) is a rectified-flow model too; all with classifier-free guidance
training (labels dropped to the null class with probability 0.1) and EMA weights (decay 0.999);
the classifier is a small CNN. Fixed seeds; progress bars; results written as safetensors with a
training.json record (steps, time, losses, held-out accuracy) next to them."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from tasks.digits import data
from tasks.digits.classifier import AuditClassifier, DigitClassifier, accuracy, train_classifier
from tasks.digits.model import (
    FLOW_TIMESTEPS,
    NULL_CLASS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    ClassEmbedding,
    ClassTransformer,
)

P_UNCOND = 0.1
EMA_DECAY = 0.999


class Conditional(nn.Module):
    """A denoiser (the U-Net, or the transformer read as one) and the class embedding it learns with."""

    def __init__(self, architecture: str = "unet") -> None:
        super().__init__()
        self.unet = UNet2DConditionModel(**UNET_CONFIG) if architecture == "unet" else ClassTransformer.fresh()
        self.embedding = ClassEmbedding()

    def forward(self, x, t, labels):
        return self.unet(x, t, encoder_hidden_states=self.embedding(labels)).sample


def _progress(total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeRemainingColumn(),
    )


def train_unet(
    out: Path,
    steps: int = 3000,
    batch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    show_progress: bool = True,
    objective: str = "epsilon",
    architecture: str = "unet",
) -> dict:
    """objective epsilon: DDPM noise prediction on the linear-beta table, t ~ U{0..999};
    flow: rectified flow, x_s = (1 - s) x_0 + s noise with s ~ U(0, 1), the velocity noise - x_0
    as target and model time 1000 s (diffusers' FlowMatchEulerDiscreteScheduler's convention)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = data.split("train")
    model = Conditional(architecture)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(EMA_DECAY))
    noise_scheduler = DDPMScheduler(
        **{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "timestep_spacing")}
    )
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: min(1.0, (s + 1) / max(warmup, 1)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))),
    )
    losses, started = [], time.perf_counter()
    label = "U-Net" if architecture == "unet" else "transformer"
    with _progress(steps, f"training the digits {label} ({objective})") as progress:
        bar = progress.add_task("train", total=steps, note="", visible=show_progress)
        for step in range(steps):
            index = torch.randint(len(images), (batch,), generator=generator)
            x0, y = images[index], labels[index].clone()
            y[torch.rand(batch, generator=generator) < P_UNCOND] = NULL_CLASS
            noise = torch.randn(x0.shape, generator=generator)
            if objective == "flow":
                s = torch.rand(batch, generator=generator)
                x_s = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * noise
                loss = nn.functional.mse_loss(model(x_s, s * FLOW_TIMESTEPS, y), noise - x0)
            else:
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
                loss = nn.functional.mse_loss(model(noise_scheduler.add_noise(x0, noise, t), t, y), noise)
            optimiser.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            ema.update_parameters(model)
            losses.append(float(loss.detach()))
            if step % 50 == 0 or step == steps - 1:
                progress.update(bar, completed=step + 1, note=f"loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    trained = ema.module
    out.mkdir(parents=True, exist_ok=True)
    if architecture == "unet":
        trained.unet.save_pretrained(out / "unet")
    else:
        trained.unet.transformer.save_pretrained(out / "transformer")
    save_file({"table": trained.embedding.table.weight.detach().contiguous()}, out / "embedding.safetensors")
    return {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "ema_decay": EMA_DECAY,
        "p_uncond": P_UNCOND,
        "objective": objective,
        "architecture": architecture,
        "parameters": sum(p.numel() for p in trained.unet.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss_mean_last_200": sum(losses[-200:]) / len(losses[-200:]),
        "threads": torch.get_num_threads(),
    }


def train_and_save_classifier(out: Path, seed: int = 0, show_progress: bool = True, audit: bool = False) -> dict:
    """The reward classifier (classifier.safetensors), or with audit the held-out judge
    (audit.safetensors: AuditClassifier, seed 1 unless given)."""
    images, labels = data.split("train")
    held_images, held_labels = data.split("held_out")
    kind, name = (AuditClassifier, "audit") if audit else (DigitClassifier, "classifier")
    epochs, started = 200 if audit else 40, time.perf_counter()  # the MLP is 20x cheaper an epoch
    with _progress(epochs, f"training the digits {name}") as progress:
        bar = progress.add_task("train", total=epochs, note="", visible=show_progress)
        model = train_classifier(
            images, labels, epochs=epochs, seed=seed, progress=lambda: progress.advance(bar), kind=kind
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / f"{name}.safetensors")
    return {
        "kind": kind.__name__,
        "epochs": epochs,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
        "held_out_accuracy": accuracy(model, held_images, held_labels),
        "train_accuracy": accuracy(model, images, labels),
    }


def record(out: Path, key: str, info: dict) -> None:
    path = out / "training.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing[key] = info
    path.write_text(json.dumps(existing, indent=2) + "\n")


@torch.no_grad()
def recognition(folder: Path, model: str, steps: int = 20, per_class: int = 100, seed: int = 1) -> dict:
    """The trained model sampled as the task samples it (its own sampler, guidance 2, `steps`
    steps), `per_class` fresh samples conditioned on each class: the share the classifier
    recognises as the class they were conditioned on."""
    from bench.registry import TASKS  # the task by name: this module is part of it, not above it
    from tasks.digits.grid import sample_classes

    task = TASKS.create(f"digits[model={model},models={folder}]")
    task.setup(torch.device("cpu"))
    samples, labels = sample_classes(task, per_class, steps, seed)
    hits = task.classifier(samples).argmax(-1) == labels
    return {
        "samples": len(labels),
        "steps": steps,
        "sampler": task.chosen_sampler().spec,
        "guidance": task.guidance,
        "seed": seed,
        "recognised": float(hits.float().mean()),
        "recognised_per_class": [round(float(hits[labels == k].float().mean()), 3) for k in range(10)],
    }


def train_all(out: Path, what: str = "all", steps: int = 3000, lr: float | None = None) -> None:
    """Train what is asked for, write it to `out` with its record in training.json."""
    if what in ("classifier", "all"):
        info = train_and_save_classifier(out)
        record(out, "classifier", info)
        print(f"classifier: held-out accuracy {info['held_out_accuracy']:.4f} in {info['seconds']} s")
    if what in ("audit", "all"):
        info = train_and_save_classifier(out, seed=1, audit=True)
        record(out, "audit", info)
        print(f"audit classifier: held-out accuracy {info['held_out_accuracy']:.4f} in {info['seconds']} s")
    if what in ("unet", "all"):
        info = train_unet(out, steps=steps, lr=lr or 1e-3)
        record(out, "unet", info)
        print(f"unet: {info['steps']} steps in {info['seconds']} s, loss {info['final_loss_mean_last_200']:.4f}")
    if what in ("flow", "all"):
        info = train_unet(out / "flow", steps=steps, lr=lr or 1e-3, objective="flow")
        record(out, "flow", info)
        print(f"flow unet: {info['steps']} steps in {info['seconds']} s, loss {info['final_loss_mean_last_200']:.4f}")
    if what in ("transformer", "all"):
        info = train_unet(out / "transformer", steps=steps, lr=lr or 5e-4, objective="flow", architecture="transformer")
        info["check"] = recognition(out, "transformer")
        record(out, "transformer", info)
        print(
            f"transformer: {info['steps']} steps in {info['seconds']} s, loss {info['final_loss_mean_last_200']:.4f}, "
            f"recognised {info['check']['recognised']:.4f}"
        )
    print(f"written to {out}")


def main(argv: list[str] | None = None) -> int:
    from tasks.digits.paths import cache_dir

    parser = argparse.ArgumentParser(prog="python -m tasks.digits.train", description=__doc__)
    parser.add_argument(
        "--what",
        choices=("unet", "flow", "transformer", "classifier", "audit", "all"),
        default="all",
        help="unet: the epsilon model; flow: the rectified-flow (velocity) U-Net; transformer: the "
        "rectified-flow MMDiT; classifier: the reward's; audit: the held-out judge (the audit reward)",
    )
    parser.add_argument("--steps", type=int, default=3000, help="denoiser training steps")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3, transformer 5e-4)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the cache)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_all(args.out or cache_dir(), args.what, args.steps, args.lr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
