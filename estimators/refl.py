"""refl: reward feedback learning on the one-step clean estimate (ImageReward's ReFL, Xu et al.
2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
Algorithm 1; docs/estimators/refl.md).

Sample without graph from x_N to x_k, where k is drawn from the last `window` fraction of the
sampling steps (ReFL draws it from the last 10 of 40), call the denoiser once with graph at x_k
and score the model's clean estimate x^_0 = (x_k - sigma_k out_k) / alpha_k (x_k - sigma_k v_k
for a velocity model: Schedule.clean_estimate) rather than the sampler's x_0:

    grad ~ d R(x^_0(sg(x_k), out_k)) / d theta = (dR/dx^_0) (-sigma_k / alpha_k) d out_k / d theta.

The gradient is that of another objective than the chain's reward: nothing reaches x_N (its
graph starts at x_k), and the steps after k are never run. The timestep the call gets is the
grid's model time t_k (ReFL's public training script passes the step's index there instead).
The gradient pass ends at x^_0, so the row's reward curve is the chain's x_0 evaluated apart.
Memory A (one call's graph plus the reward's), time (N - k + 1) F + V.
"""

from __future__ import annotations

import random

import torch

from bench.errors import SpecError
from bench.options import Option
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop, step_choice


def _window(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]: the fraction of the last sampling steps k is drawn from"


class ReFL(Estimator):
    name = "refl"
    plot_style = ("#17becf", "h")
    summary = "ReFL: one graph call at a late step, the reward on its clean estimate x^_0"
    samples_long_chain = False  # the gradient pass stops at x^_0 of step k
    options = (
        Option("window", float, 0.25, "k is drawn from this fraction of the last sampling steps", check=_window),
        Option(
            "step",
            str,
            "random",
            "random: uniform in the window on every call; or a 0-based index in sampling order",
            check=step_choice("random"),
            metavar="random|<index>",
        ),
    )
    variants = ("window=1", "step=0")

    @property
    def random_counts(self) -> bool:
        return self.step == "random"

    def check_steps(self, steps: int) -> None:
        if self.step != "random" and int(self.step) >= steps:
            raise SpecError(f"{self.spec}: step index {self.step} is outside the chain; valid: 0..{steps - 1}, random")

    def window_steps(self, steps: int) -> list[int]:
        """Grid indices (1 = the last call) k may take: the last ceil(window N) calls."""
        return list(range(max(1, round(self.window * steps)), 0, -1))

    def kept_grid_index(self, steps: int, rng: random.Random | None) -> int:
        if self.step == "random":
            window = self.window_steps(steps)
            return window[rng.randrange(len(window))] if rng is not None else window[0]
        return steps - int(self.step)

    def skip_reason(self, problem: Problem) -> str | None:
        first_call = self.step == "0" or problem.num_steps == 1
        if problem.target == "latent" and not first_call:
            return (
                "ReFL's graph starts at x_k, after the sampler has left x_N: the latent gets no "
                "gradient (step=0 keeps the first call)"
            )
        if problem.target == "noise":
            return "ReFL scores x^_0 of step k, which no injected noise reaches (the noises enter after the call)"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        if self.step == "random":
            window = self.window_steps(steps)
            forwards = steps - sum(window) / len(window) + 1  # the mean of N - k + 1 over the window
        else:
            forwards = int(self.step) + 1
        return Cost(nfe_forward=forwards, nfe_vjp=1.0, memory="A", activations=1)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        steps = schedule.num_steps
        k = self.kept_grid_index(steps, rng)
        x_start = problem.x_start
        state = schedule.start(x_start.detach())
        with torch.no_grad():
            for i in range(steps, k, -1):
                state = chain.advance(state, i, cond, problem.noises)
        x_k = x_start if k == steps else state[0]
        clean = schedule.clean_estimate(x_k, k, chain.eps(x_k, k, cond))
        return backprop(problem, clean)
