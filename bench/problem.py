"""What a task hands an estimator: the chain, its inputs, the reward and the leaves to differentiate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from bench.chain import Chain

TARGETS = ("latent", "cond", "weights", "noise")  # what every task serves
GATES = "gates"  # DiP-GO's keep/reuse gate logits: tasks with gated denoiser blocks (digits)
TARGET_HELP = {
    "latent": "the initial latent x_N (guided generation, adversarial auditing)",
    "noise": "x_N and every injected noise xi_i of the eta > 0 sampler (DNO)",
    "cond": "the conditioning embedding c (textual-inversion-like)",
    "weights": "the denoiser's trainable parameters theta (reward fine-tuning)",
    "gates": "keep/reuse gate logits per (step, block) of a gated denoiser (DiP-GO's pruning search)",
}


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
    # the task's distilled few-step student (ShortFT): steps K -> its K-step chain on this problem's
    # denoiser (trainable leaves shared), or None where the task has none
    shortcut: Callable[[int], Chain] | None = None
    _students: dict[int, Chain] = field(default_factory=dict, repr=False)
    # a term of the loss on the leaves themselves (DiP-GO's sparsity on the gates), or None
    penalty: Callable[[], Tensor] | None = None
    # why the denoiser must be called along the sampler's grid, N..1 in one pass (a stateful
    # denoiser: the gates' block cache), or None where any call order is valid
    in_order_only: str | None = None

    def student(self, steps: int) -> Chain:
        """The task's K-step student chain, built once per problem (loading a student is not part of
        a gradient)."""
        if steps not in self._students:
            self._students[steps] = self.shortcut(steps)
        return self._students[steps]

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
        parts = [(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).reshape(-1)
                 for leaf in self.leaves]
        return torch.cat(parts) if parts else torch.zeros(0)
