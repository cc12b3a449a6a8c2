"""What a task hands an estimator: the chain, its inputs, the reward and the leaves to differentiate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from bench.chain import Chain


@dataclass(frozen=True)
class Target:
    """What an estimator can differentiate. The four of TARGETS are every task's; a task that
    brings a target of its own registers it (`register_target`) in its module, with what a task
    needs to serve it and how many of the chain's first calls no gradient to it reaches."""

    name: str
    help: str
    needs: str = ""  # what a task must have to serve it, for the refusal of a task that has not
    unreached_calls: int = 0  # leading denoiser calls whose output depends on none of its leaves


TARGETS = ("latent", "cond", "weights", "noise")  # what every task serves
TARGET_INFO: dict[str, Target] = {
    target.name: target
    for target in (
        Target("latent", "the initial latent x_N (guided generation, adversarial auditing)"),
        Target("cond", "the conditioning embedding c (textual-inversion-like)"),
        Target("weights", "the denoiser's trainable parameters theta (reward fine-tuning)"),
        Target("noise", "x_N and every injected noise xi_i of the eta > 0 sampler (DNO)"),
    )
}


def register_target(target: Target) -> str:
    """Make a task-owned target known (its help in `bench list`, its needs in refusals); its name."""
    known = TARGET_INFO.get(target.name)
    if known is not None and known != target:
        raise ValueError(f"target {target.name!r} is already registered differently")
    TARGET_INFO[target.name] = target
    return target.name


def unreached_calls(target: str) -> int:
    return TARGET_INFO[target].unreached_calls if target in TARGET_INFO else 0


@dataclass
class Problem:
    """One differentiable sampling problem. `leaves` are the tensors whose `.grad` an estimator
    fills; exactly one target's tensors require grad."""

    chain: Chain
    x_start: Tensor  # x_N
    cond: Tensor | None
    noises: list[Tensor] | None  # xi_i at [i - 1], present when eta > 0
    reward_fn: Callable[[Tensor], Tensor]  # x_0 -> per-sample rewards (B,)
    target: str
    leaves: list[Tensor]
    # a term of the loss on the leaves themselves (a regulariser, e.g. a sparsity cost), or None
    penalty: Callable[[], Tensor] | None = None
    # capabilities an estimator must provide to serve this problem: name -> why (bench/capabilities.py)
    requires: dict[str, str] = field(default_factory=dict)
    # what the task hands the estimators that need more than the chain: name -> object (bench/capabilities.py)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.chain.schedule.num_steps

    def loss(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, rewards) with loss = -mean(R(x_0)) (+ the penalty on the leaves, where any)."""
        rewards = self.reward_fn(x0)
        loss = -rewards.mean()
        return (loss + self.penalty() if self.penalty is not None else loss), rewards

    def zero_grad(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def flat_grad(self) -> Tensor:
        """All leaves' gradients as one vector (zeros where a leaf received none)."""
        parts = [(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).reshape(-1) for leaf in self.leaves]
        return torch.cat(parts) if parts else torch.zeros(0)
