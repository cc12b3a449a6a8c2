"""diffusion-nft: the DiffusionNFT objective, no gradient through sampling at all (Zheng et al. 2026,
"DiffusionNFT: Online Diffusion Reinforcement with Forward Process", its loss with the implicit
positive and negative policies; docs/estimators/diffusion-nft.md).

Sample x_0 without graph, score it, turn the rewards into optimality probabilities
r = 1/2 + 1/2 clip((R - mean) / std, -1, 1) over the batch, put each x_0 back at a grid point i
drawn per sample with fresh noise xi (x_i = alpha_i x_0 + sigma_i xi, the forward process), and
regress the model output there on the forward process's own target (xi for an epsilon model,
xi - x_0 for a velocity) through the two implicit policies

    out+ = (1 - beta) sg(out) + beta out,    out- = (1 + beta) sg(out) - beta out,
    L = mean_b [ r_b ||out+ - target||^2 + (1 - r_b) ||out- - target||^2 ] / D,

with the sampling policy the current model itself (on-policy: sg(out) is its output now; the
paper keeps a slowly updated copy). Its gradient, 2 beta (2 r - 1) (out - target) d out / d theta
per sample, pulls the model toward the forward process of the well-scored samples and away from
the others: a fine-tuning direction, not an estimate of the reward gradient, so its agreement with
the exact gradient is reported and nothing more. The reward need not be differentiable. Memory A,
time (N + 1) F + V.
"""

from __future__ import annotations

import random

import torch

from bench.options import Option
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator
from estimators.randomness import torch_generator


def _beta(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


class DiffusionNFT(Estimator):
    name = "diffusion-nft"
    reward_gradient = False  # the reward is only evaluated
    plot_style = ("#aec7e8", "8")
    summary = "DiffusionNFT: reward-split flow-matching loss on forward-noised samples (no backprop through sampling)"
    options = (Option("beta", float, 1.0, "the implicit policies' step beta", check=_beta),)
    variants = ("beta=0.1",)

    @property
    def random_counts(self) -> bool:
        return False

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.target in ("latent", "noise"):
            return f"DiffusionNFT trains the model on its own samples; the {problem.target} does not enter its loss"
        if problem.x_start.shape[0] < 2:
            return "the rewards are normalised over the batch: it needs at least two samples"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(nfe_forward=steps + 1, nfe_vjp=1, memory="A", activations=1)

    @staticmethod
    def optimality(rewards: torch.Tensor) -> torch.Tensor:
        """r = 1/2 + 1/2 clip((R - mean) / std, -1, 1): the batch's rewards as probabilities in [0, 1]."""
        z = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        return 0.5 + 0.5 * z.clamp(-1, 1)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule = problem.chain, problem.chain.schedule
        x0 = chain.sample(problem.x_start, problem.cond, problem.noises)
        with torch.no_grad():
            loss_value, rewards = problem.loss(x0)
        r = self.optimality(rewards.detach().to(x0.dtype))
        generator = torch_generator(rng)
        effective = schedule.effective_steps()
        picks = torch.randint(len(effective), (x0.shape[0],), generator=generator)
        grid = torch.tensor([effective[int(p)] for p in picks])
        xi = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        alpha = torch.tensor([schedule.alpha(int(i)) for i in grid], dtype=x0.dtype, device=x0.device).view(shape)
        sigma = torch.tensor([schedule.sigma(int(i)) for i in grid], dtype=x0.dtype, device=x0.device).view(shape)
        x_i = alpha * x0 + sigma * xi
        times = torch.tensor([schedule.model_time(int(i)) for i in grid], dtype=x0.dtype, device=x0.device)
        out = chain.denoise_at(x_i, times, problem.cond)
        target = xi - x0 if schedule.prediction == "flow" else xi
        positive = (1 - self.beta) * out.detach() + self.beta * out
        negative = (1 + self.beta) * out.detach() - self.beta * out
        per_sample = lambda v: ((v - target) ** 2).flatten(1).mean(1)  # noqa: E731
        loss = (r * per_sample(positive) + (1 - r) * per_sample(negative)).mean()
        loss.backward()
        return Estimate(loss=float(loss_value), rewards=rewards.detach(), x0=x0.detach())
