"""coarse-adjoint: the discrete adjoint on a coarse subset of the sampler's own grid, through the
cached forward states (this suite's attempt at the gap between the one-call shortcuts and the
exact N-VJP methods; in none of its papers).

The exact gradient of an Euler sampler (DDIM, flow-matching Euler) is its discrete adjoint: for
each step i, from x_0 back to x_N, one VJP of the model at the step's input x_i with the adjoint
of its output, a_i = a_{i-1} + (s_{i-1} - s_i) a_{i-1}^T d out(x_i)/dx (and the same VJP's
parameter part). coarse-adjoint takes M = floor(budget N) of those steps, on every k-th point of
the sampler's grid (k about N / M, points spread evenly): each coarse interval [s_a, s_b] is one
step of the same rule, with the VJP at the cached state x_b, exact, and the model time the
sampler's own. So:

- at budget = 1 it is the exact gradient (to rounding) on DDIM and flow-matching Euler;
- the coarse step keeps the rule's stability: on the high-noise mode (sigma J = I) its factor
  rho_a / rho_b = e^{-du} is exact at any width, where Euler in rho (the plain coarse adjoint)
  overshoots to negative factors and diverges on the digits model;
- memory A + N*S (the states, no activations); time NF + M(F + V).

Other solvers between the points (`solver`, as the adjoint's) are options; they take more VJPs
per interval or drift off the chain. Measured on digits weights at N = 50 (tests and the frontier
figure, reports/figures): see the README's "The frontier"."""
from __future__ import annotations

import math

from bench.options import Option
from estimators.adjoint import SOLVERS, Adjoint
from estimators.base import Cost


def _budget(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1] (VJPs per gradient as a fraction of N)"


class CoarseAdjoint(Adjoint):
    name = "coarse-adjoint"
    summary = "discrete adjoint on every k-th sampler point through cached states (~budget*N VJPs)"
    options = (
        Option("budget", float, 0.25, "VJPs per gradient as a fraction of N", check=_budget),
        Option("solver", str, "discrete", "rule on each coarse interval: discrete (the chain's own "
               "adjoint step), euler, ab2, heun, dpm2 (see adjoint)", choices=tuple(SOLVERS)),
    )
    variants = ("budget=0.5", "budget=1", "solver=heun")
    steps, recover = 0, "cache"  # the adjoint's options, fixed here

    @property
    def exact(self) -> bool:
        """At budget 1 the discrete rule steps over every sampler interval: the exact gradient on
        single-step samplers (checked by the conformance suite's budget=1 variant)."""
        return self.solver == "discrete" and self.budget >= 1

    @property
    def convergence_order(self) -> float | None:
        return None  # at a fixed fraction of N the grid refines with N; no order is claimed

    def intervals(self, steps: int) -> int:
        return max(1, math.floor(self.budget * steps / SOLVERS[self.solver][1] + 1e-9))

    def points(self, steps: int) -> list[int]:
        """Sampler grid indices of the coarse points, 0 and N included, spread evenly."""
        m = min(self.intervals(steps), steps)
        return sorted({round(j * steps / m) for j in range(m + 1)})

    def cost(self, steps: int, target: str) -> Cost:
        evaluations = (len(self.points(steps)) - 1) * SOLVERS[self.solver][1]
        return Cost(nfe_forward=steps + evaluations, nfe_vjp=evaluations, memory="A + N·S",
                    activations=1, latents=steps)

    def adjoint_grid(self, schedule) -> tuple[list[float], list[int] | None]:
        nodes = self.points(schedule.num_steps)
        return [schedule.ode_point(i) for i in nodes], nodes
