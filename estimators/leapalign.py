"""leapalign: the reward gradient along a two-leap trajectory carved from the rollout (LeapAlign,
Liang et al. 2026, "LeapAlign: Post-Training Flow Matching Models at Any Generation Step by
Building Two-Step Trajectories", its leap trajectory and gradient discounting;
docs/estimators/leapalign.md).

Sample the chain without graph, then draw grid points k > j and rebuild x_0 from two leaps, each
one denoiser call that jumps several steps at once: from the model's clean estimate x^_0 and the
noise it implies n^ = (x - alpha x^_0) / sigma, leap(x_k, k -> j) = alpha_j x^_0 + sigma_j n^
(x_k + (sigma_j - sigma_k) v_k for a velocity). Connectors keep the forward values those of the
real rollout while the gradient runs along the leaps:

    x_j' = leap(x_k, out_k, k -> j) + sg(x_j - leap(...)),
    x_0' = leap(x_j', out_j(g x_j' + (1 - g) sg(x_j')), j -> 0) + sg(x_0 - leap(...)),

with the reward on x_0' (= the rollout's x_0). The nested term, the gradient that reaches the
first leap through the second call's input Jacobian, is discounted by g (`discount`), not dropped
as DRTune drops it; the linear path through x_j' is kept whole. With g = 1 on N = 2 the leaps are
the sampler's own steps and the gradient is the chain's (tested). The paper's per-sample weights
by how close the leaps come to the rollout are not taken. Memory 2A, time (N + 2) F + 2V.
"""

from __future__ import annotations

import random


from bench.errors import SpecError
from bench.options import Option
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, step_choice, backprop


def _discount(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1] (1: the nested term whole, 0: dropped)"


def leap(schedule, x, out, k: int, j: int):
    """One call's jump from grid point k to j: the clean estimate and its implied noise put at j's level."""
    clean = schedule.clean_estimate(x, k, out)
    noise = (x - schedule.alpha(k) * clean) / schedule.sigma(k)
    return schedule.alpha(j) * clean + schedule.sigma(j) * noise


class LeapAlign(Estimator):
    name = "leapalign"
    plot_style = ("#8c564b", "d")
    summary = "LeapAlign: two leaps k -> j -> 0 with connectors to the rollout, nested term discounted"
    options = (
        Option(
            "first",
            str,
            "random",
            "the first leap's start k (0-based index in sampling order); random: k > j drawn per call",
            check=step_choice("random"),
            metavar="random|<index>",
        ),
        Option(
            "second",
            str,
            "random",
            "the second leap's start j (0-based index, after first); random: uniform after k",
            check=step_choice("random"),
            metavar="random|<index>",
        ),
        Option("discount", float, 0.5, "weight of the nested term through the second call's input", check=_discount),
    )
    variants = ("first=0,second=1,discount=1", "discount=0")

    def check_steps(self, steps: int) -> None:
        for name in ("first", "second"):
            value = getattr(self, name)
            if value != "random" and int(value) >= steps:
                raise SpecError(f"{self.spec}: {name}={value} is outside the chain; valid: 0..{steps - 1}, random")
        if "random" not in (self.first, self.second) and int(self.second) <= int(self.first):
            raise SpecError(f"{self.spec}: second={self.second} must come after first={self.first}")

    def leap_points(self, steps: int, rng: random.Random | None) -> tuple[int, int]:
        """Grid indices (k, j), N >= k > j >= 1."""
        draw = (lambda lo, hi: rng.randint(lo, hi)) if rng is not None else (lambda lo, hi: hi)
        k = steps - int(self.first) if self.first != "random" else draw(2, steps)
        j = steps - int(self.second) if self.second != "random" else draw(1, k - 1)
        return k, j

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.num_steps < 2:
            return "two leaps need N >= 2 steps"
        if problem.target == "latent" and self.first != "0":
            return "the first leap starts after x_N unless first=0: the latent gets no gradient"
        if problem.target == "noise":
            return "the leaps run through the model outputs; the injected noises are not on them"
        schedule = problem.chain.schedule
        if schedule.eta > 0 or schedule.history_size:
            return f"{schedule.sampler}: a leap is a one-step jump of a deterministic one-step sampler"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(nfe_forward=steps + 2, nfe_vjp=2, memory="2A", activations=2)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        steps = schedule.num_steps
        k, j = self.leap_points(steps, rng)
        x0, states = chain.sample(problem.x_start, cond, problem.noises, keep_states=True)
        x_k = problem.x_start if k == steps else states[steps - k]
        first = leap(schedule, x_k, chain.eps(x_k, k, cond), k, j)
        x_j = first + (states[steps - j] - first).detach()
        g = self.discount
        into_call = g * x_j + (1 - g) * x_j.detach() if g < 1 else x_j
        second = leap(schedule, x_j, chain.eps(into_call, j, cond), j, 0)
        return backprop(problem, second + (x0 - second).detach())
