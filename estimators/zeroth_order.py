"""zeroth-order: antithetic Gaussian smoothing (SPSA / evolution strategies; DNO's no-grad
variant; docs/estimators/index.md). No backprop at all: only samplings.

    g = -(1/(2 mu n)) sum_j [J(z + mu u_j) - J(z - mu u_j)] u_j,   u_j ~ N(0, I),

with J the mean reward of the sampler's x_0 (less the problem's penalty on the leaves, if any) and z all the target's leaves at once. g is an
unbiased estimate of the gradient of the loss of the smoothed objective J_mu(z) = E_u J(z + mu u),
which tends to the true gradient as mu -> 0 (bias O(mu^2) for smooth J). It needs no
differentiable reward. Time 2nNF (+ NF for the reward at z), memory of sampling only."""

from __future__ import annotations

import random

import torch

from bench.capabilities import IN_ORDER
from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, write_gradients
from estimators.randomness import torch_generator


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


class ZerothOrder(Estimator):
    name = "zeroth-order"
    reward_gradient = False  # the reward is only evaluated
    plot_style = ("#e377c2", "*")  # colour and marker in every figure
    summary = "antithetic random-direction finite differences; no backprop (SPSA / ES)"
    options = (
        Option("n", int, 8, "antithetic direction pairs per gradient", check=at_least(1)),
        Option("mu", float, 0.01, "smoothing radius (perturbation size)", check=_positive),
    )
    variants = ("n=1", "n=3,mu=0.1")
    provides = frozenset({IN_ORDER})

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(nfe_forward=(2 * self.n + 1) * steps, nfe_vjp=0, memory="sampling only", activations=0, working=1)

    @torch.no_grad()
    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, leaves = problem.chain, problem.leaves
        generator = torch_generator(rng)

        def mean_reward() -> float:  # J = -loss: the mean reward, less the leaves' penalty where any
            x0 = chain.sample(problem.x_start, problem.cond, problem.noises)
            return -float(problem.loss(x0)[0])

        grads = [torch.zeros_like(leaf) for leaf in leaves]
        for _ in range(self.n):
            directions = [
                torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device) for leaf in leaves
            ]
            for leaf, u in zip(leaves, directions):
                leaf.add_(self.mu * u)
            plus = mean_reward()
            for leaf, u in zip(leaves, directions):
                leaf.sub_(2 * self.mu * u)
            minus = mean_reward()
            for leaf, u in zip(leaves, directions):
                leaf.add_(self.mu * u)  # back to z (up to rounding)
            for grad, u in zip(grads, directions):
                grad.sub_((plus - minus) / (2 * self.mu * self.n) * u)  # gradient of the loss -J
        write_gradients(
            problem,
            next((g for leaf, g in zip(leaves, grads) if leaf is problem.x_start), None),
            [g for leaf, g in zip(leaves, grads) if leaf is not problem.x_start],
        )
        x0 = chain.sample(problem.x_start, problem.cond, problem.noises)
        loss, rewards = problem.loss(x0)
        return Estimate(loss=float(loss), rewards=rewards, x0=x0)
