"""Sample a grid from the digits model and measure how often the classifier recognises the class
each sample was conditioned on: `python -m tasks.digits.grid [--out PNG] [--steps N] [--guidance W]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.chain import Chain


@torch.no_grad()
def sample_classes(task, per_class: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples (10 * per_class, 1, 8, 8), labels), conditioned on each class in turn."""
    denoiser = task.denoiser("latent", torch.float32, seed)
    chain = Chain(denoiser, task.make_schedule(steps))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    x = torch.randn(len(labels), 1, 8, 8, generator=generator)
    cond = task.embeddings[labels].float()
    return chain.sample(x, cond), labels


def save_grid(samples: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_class = int((labels == 0).sum())
    fig, axes = plt.subplots(10, per_class, figsize=(per_class * 0.6, 10 * 0.6 + 0.6))
    for index, ax in enumerate(axes.flat):
        ax.imshow(samples[index, 0].clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if predicted[index] != labels[index]:
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
        if index % per_class == 0:
            ax.set_ylabel(str(int(labels[index])), rotation=0, labelpad=10, fontsize=11)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from bench.registry import TASKS

    parser = argparse.ArgumentParser(prog="python -m tasks.digits.grid", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("reports/digits_samples.png"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--models", default="")
    parser.add_argument("--model", default="epsilon", choices=("epsilon", "flow", "transformer"))
    parser.add_argument("--sampler", default="", help="a sampler spec (default: the model's own)")
    args = parser.parse_args(argv)
    options = (
        [f"guidance={args.guidance}", f"model={args.model}"]
        + ([f"models={args.models}"] if args.models else [])
        + ([f"sampler={args.sampler}"] if args.sampler else [])
    )
    task = TASKS.create(f"digits[{','.join(options)}]")
    task.preflight()
    task.setup(torch.device("cpu"))
    samples, labels = sample_classes(task, args.per_class, args.steps)
    with torch.no_grad():
        predicted = task.classifier(samples).argmax(-1)
    accuracy = float((predicted == labels).float().mean())
    per_class = [float((predicted[labels == k] == k).float().mean()) for k in range(10)]
    sampler = task.chosen_sampler().spec
    title = (
        f"{args.model} model, {sampler} {args.steps} steps, guidance {args.guidance}: the classifier recognises\n"
        f"{accuracy:.0%} of samples as their conditioning class (misses framed red)"
    )
    save_grid(samples, labels, predicted, args.out, title)
    print(title.replace("\n", " "))
    print("per class: " + ", ".join(f"{k}: {a:.0%}" for k, a in enumerate(per_class)))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
