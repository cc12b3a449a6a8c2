"""truncated: backprop through the last K denoiser calls only (DRaFT-K, arXiv 2309.17400;
AlignProp, arXiv 2310.03739; docs/estimators/index.md).

The first N - K steps run without graph. DRaFT detaches the latent before the last K steps, so
x_N gets no gradient unless K = N. AlignProp (`latent_path=true`) detaches only the early
denoiser outputs and keeps the linear latent path back to x_N. `rand=true` draws K uniformly
from [k_min, k_max] on every call (AlignProp's `truncated_backprop_rand`).
"The last K calls" counts the calls whose output enters the chain: a schedule that ends on an
identity step (leading spacing with steps_offset = 0; trailing at N = T) gives that call's output
weight 0, and keeping it would be a silent zero gradient. Memory K*A, time about NF + K(F + V)."""

from __future__ import annotations

import random

from bench.capabilities import IN_ORDER
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop, reached_calls
from estimators.masked_chain import run_masked_chain


class Truncated(Estimator):
    name = "truncated"
    plot_style = ("#2ca02c", "v")  # colour and marker in every figure
    summary = "backprop through the last K steps only (DRaFT-K / AlignProp)"
    provides = frozenset({IN_ORDER})
    options = (
        Option("k", int, 1, "number of final steps that keep their graph", check=at_least(1)),
        Option("latent_path", bool, False, "keep the linear latent path through early steps (AlignProp)"),
        Option("rand", bool, False, "draw K uniformly from [k_min, k_max] on every call"),
        Option("k_min", int, 1, "smallest K when rand=true", check=at_least(1)),
        Option("k_max", int, 0, "largest K when rand=true (0: the step count N)", check=at_least(0)),
    )
    variants = ("k=2", "k=2,latent_path=true", "k=4", "rand=true,k_min=1,k_max=3")

    @property
    def random_counts(self) -> bool:
        return self.rand

    def __init__(self, **values):
        super().__init__(**values)
        if self.rand and self.k_max and self.k_min > self.k_max:
            raise SpecError(f"truncated: k_min={self.k_min} is above k_max={self.k_max}")

    def _k_range(self, steps: int) -> tuple[int, int]:
        if not self.rand:
            return self.k, self.k
        return self.k_min, (self.k_max or steps)

    def check_steps(self, steps: int) -> None:
        low, high = self._k_range(steps)
        if high > steps or low > steps:
            which = f"k={self.k}" if not self.rand else f"k_min={self.k_min}, k_max={self.k_max}"
            raise SpecError(f"{self.spec}: {which} exceeds the step count N={steps}; valid: 1 <= k <= {steps}")

    def skip_reason(self, problem: Problem) -> str | None:
        low, _ = self._k_range(problem.num_steps)
        effective = len(problem.chain.schedule.effective_steps())
        if problem.target in ("latent", "noise") and not self.latent_path and low < effective:
            return (
                "DRaFT detaches the latent before the last K steps, so x_N gets no gradient "
                "unless K = N; use latent_path=true (AlignProp) or k=N"
            )
        return None

    def cost(self, steps: int, target: str) -> Cost:
        low, high = self._k_range(steps)
        k = self.k if not self.rand else (low + high) / 2  # expected K when random
        return Cost(nfe_forward=steps, nfe_vjp=k, memory="K·A", activations=k)

    def cost_for(self, problem: Problem) -> Cost:
        cost = self.cost(problem.num_steps, problem.target)
        effective = min(len(problem.chain.schedule.effective_steps()), reached_calls(problem.num_steps, problem.target))
        if cost.nfe_vjp <= effective:
            return cost
        return Cost(nfe_forward=cost.nfe_forward, nfe_vjp=effective, memory=cost.memory, activations=effective)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        low, high = self._k_range(problem.num_steps)
        k = rng.randint(low, high)
        kept = set(problem.chain.schedule.effective_steps()[-k:])  # the last K that matter
        x0 = run_masked_chain(problem, keep_graph=kept.__contains__, keep_latent_path=self.latent_path)
        return backprop(problem, x0)
