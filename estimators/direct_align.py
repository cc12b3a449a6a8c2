"""direct-align: the reward on an image recovered from injected known noise (Direct-Align, the
gradient of SRPO: Shen et al. 2025, "Directly Aligning the Full Diffusion Trajectory with
Fine-Grained Human Preference", its Direct-Align steps 1-3; docs/estimators/direct-align.md).

Sample x_0 without graph, put it back at grid point s with a known noise xi (the chain's own x_N,
as the online variant does), take one sampler step with graph, and recover the clean image by
removing the known noise at the level the step lands on:

    x_s = alpha_s x_0 + sigma_s xi,    x' = step(x_s, out(x_s)),    x^_0 = (x' - sigma' xi) / alpha',

with the gradient through out(x_s) only (x_0 and xi are detached). (alpha', sigma') is the level
the step lands on, the step applied to the ideal output (xi for an epsilon model, xi - x_0 for a
velocity): (alpha_{s-1}, sigma_{s-1}) where the step lands on the next grid point; on
flow-matching Euler dx^_0/d out = (sigma_{s-1} - sigma_s) / (1 - sigma_{s-1}). Unlike ReFL's estimate from x_s alone,
most of x^_0 is the known clean image, so the reward sees a sharp image even from high noise.
`step` draws s: random (uniform over the calls whose output enters the chain, per call) or a
0-based index in sampling order. Memory A, time (N + 1) F + V; x_N and the injected noises get no
gradient, and stochastic (eta > 0) and multistep samplers have no one-step landing level (skips).
"""

from __future__ import annotations

import random

import torch

from bench.errors import SpecError
from bench.options import Option
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop, step_choice


class DirectAlign(Estimator):
    name = "direct-align"
    plot_style = ("#e377c2", "v")
    summary = "Direct-Align (SRPO): inject known noise into x_0, one step with graph, recover x^_0"
    samples_long_chain = False  # the gradient pass ends at the recovered image
    options = (
        Option(
            "step",
            str,
            "random",
            "the injection point: random (uniform per call) or a 0-based index in sampling order",
            check=step_choice("random"),
            metavar="random|<index>",
        ),
    )
    variants = ("step=0",)

    @property
    def random_counts(self) -> bool:
        return False  # N + 1 forwards and one VJP whatever the draw

    def check_steps(self, steps: int) -> None:
        if self.step != "random" and int(self.step) >= steps:
            raise SpecError(f"{self.spec}: step index {self.step} is outside the chain; valid: 0..{steps - 1}, random")

    def injection_point(self, schedule, rng: random.Random | None) -> int:
        """Grid index s of the re-noised sample: `step`'s, or drawn among the calls that enter x_0."""
        if self.step == "random":
            effective = schedule.effective_steps()
            return effective[rng.randrange(len(effective))]
        return schedule.num_steps - int(self.step)

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.target in ("latent", "noise"):
            return (
                f"Direct-Align's graph starts at the re-noised sample, built from a detached x_0: the "
                f"{problem.target} gets no gradient"
            )
        schedule = problem.chain.schedule
        if self.step != "random" and schedule.is_identity(self.injection_point(schedule, None)):
            return f"the step at step={self.step} is an identity step (its output has weight 0); choose another"
        if schedule.eta > 0 or schedule.history_size:
            return (
                f"{schedule.sampler} is stochastic or multistep: one step from the re-noised sample has no "
                "single noise level to remove the known noise at (use a deterministic one-step sampler)"
            )
        return None

    @staticmethod
    def landing(schedule, s: int) -> tuple[float, float]:
        """(alpha', sigma'): where step s takes alpha_s x_0 + sigma_s xi when the model's output is
        the ideal one (xi for epsilon, xi - x_0 for a velocity): the step run on coefficients."""
        ideal = [-1.0, 1.0] if schedule.prediction == "flow" else [0.0, 1.0]
        start = torch.tensor([schedule.alpha(s), schedule.sigma(s)], dtype=torch.float64)
        landed = schedule.advance(schedule.start(start), s, torch.tensor(ideal, dtype=torch.float64))[0]
        return float(landed[0]), float(landed[1])

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(nfe_forward=steps + 1, nfe_vjp=1.0, memory="A", activations=1)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        s = self.injection_point(schedule, rng)
        xi = problem.x_start.detach()
        x0 = chain.sample(xi, cond, problem.noises)
        x_s = schedule.alpha(s) * x0 + schedule.sigma(s) * xi
        landed = schedule.advance(schedule.start(x_s), s, chain.eps(x_s, s, cond))[0]
        alpha, sigma = self.landing(schedule, s)
        recovered = (landed - sigma * xi) / alpha
        return backprop(problem, recovered)
