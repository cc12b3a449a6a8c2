"""draft-lv: DRaFT-LV (arXiv 2309.17400, section 4.2; docs/estimators/index.md).

Sample x_0 without graph, then n times re-noise it to the last step's noise level and take that
one step again with its graph kept:

    x_1^j = alpha_1 x_0 + sigma_1 xi_j,   x_0^j = step_1(x_1^j, eps(x_1^j, t_1, c)),
    loss  = -(1/n) sum_j mean R(x_0^j)

The gradient reaches the conditioning and the weights through the n final calls only; x_N gets
none, which is a skip reason. Each copy is backpropagated as soon as it is built, so memory is one
call's activations A (the paper's n-fold graph is not needed). Time about NF + n(F + V).
The reward returned is the sampler's own x_0's. On a multistep solver the re-taken step uses the
sampled trajectory's history (DPM-Solver++ runs its last step at first order by default, so none). "The last step" is the last one whose denoiser
output enters the chain: a schedule ending on identity steps (leading spacing with
steps_offset = 0) would otherwise give a zero gradient; the identity steps after it change nothing.
"""

from __future__ import annotations

import random

import torch

from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator
from estimators.randomness import torch_generator


class DraftLV(Estimator):
    name = "draft-lv"
    plot_style = ("#17becf", "P")  # colour and marker in every figure
    summary = "re-noise x_0 n times and backprop through the last step only (DRaFT-LV)"
    options = (Option("n", int, 2, "re-noised copies of x_0 (the paper uses 2)", check=at_least(1)),)
    variants = ("n=1", "n=5")

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.target in ("latent", "noise"):
            return "draft-lv restarts from a re-noised x_0, so no gradient reaches x_N or the injected noise"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(nfe_forward=steps + self.n, nfe_vjp=self.n, memory="A", activations=1)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        last = schedule.effective_steps()[-1]  # the steps after it are identities
        with torch.no_grad():
            state = schedule.start(problem.x_start.detach())
            for i in range(schedule.num_steps, 0, -1):
                if i == last:
                    history = state[1:]  # a multistep solver's memory at that step
                state = chain.advance(state, i, cond, problem.noises)
        x0 = state[0]
        generator = torch_generator(rng)
        for _ in range(self.n):
            xi = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            x1 = schedule.alpha(last) * x0 + schedule.sigma(last) * xi
            x0_j = chain.advance((x1, *history), last, cond, problem.noises)[0]
            loss_j, _ = problem.loss(x0_j)
            (loss_j / self.n).backward()
        loss, rewards = problem.loss(x0)
        return Estimate(loss=float(loss), rewards=rewards.detach(), x0=x0)
