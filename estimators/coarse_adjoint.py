"""coarse-adjoint: the discrete adjoint on a coarse subset of the sampler's own grid, through the
cached forward states (this suite's attempt at the gap between the one-call shortcuts and the
exact N-VJP methods; in none of its papers).

The exact gradient of an Euler sampler (DDIM, flow-matching Euler) is its discrete adjoint: for
each step i, from x_0 back to x_N, one VJP of the model at the step's input y_i with the adjoint
of its output, a_i = a_{i-1} + (s_{i-1} - s_i) a_{i-1}^T df(y_i, s_i)/dy (f, y and s as in
estimators/adjoint.py; the same VJP's parameter part likewise). coarse-adjoint supplies only the
grid on which the adjoint's loop runs: M = floor(budget N / stages) intervals, on every k-th point of
the sampler's grid (k about N / M, points spread evenly): each coarse interval [s_a, s_b] is one
step of the same rule, with the VJP at the cached state x_b, exact, and the model time the
sampler's own. So:

- at budget = 1 it is the exact gradient (to rounding) on DDIM and flow-matching Euler;
- the coarse step keeps the rule's stability: on the high-noise mode (sigma J = I) its factor
  rho_a / rho_b = e^{-du} is exact at any width, where Euler in rho (the plain coarse adjoint)
  overshoots to negative factors and diverges on the digits model;
- memory A + N*S (the states, no activations); time NF + M(F + V).

Other solvers between the points (`solver`, any of estimators/adjoint_solvers.py) are options; they
take more VJPs per interval or drift off the chain. Measured on digits weights at N = 50 (tests and the frontier
figure, reports/figures): see docs/findings.md, "Figure 5"."""

from __future__ import annotations

import math

from bench.options import Option
from estimators.adjoint import Adjoint
from estimators.adjoint_solvers import SOLVERS


def _budget(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1] (VJPs per gradient as a fraction of N)"


class CoarseAdjoint(Adjoint):
    """The adjoint's loop and solvers on a coarse subset of the sampler's grid: this class supplies
    only that grid, its options and what it claims (exactness, no convergence order)."""

    name = "coarse-adjoint"
    plot_style = ("#e6194b", ">")  # colour and marker in every figure
    summary = "discrete adjoint on every k-th sampler point through cached states (~budget*N VJPs)"
    options = (
        Option("budget", float, 0.25, "VJPs per gradient as a fraction of N", check=_budget),
        Option(
            "solver",
            str,
            "discrete",
            "rule on each coarse interval: discrete (the chain's own "
            "adjoint step), euler, ab2, heun, dpm2 (see adjoint)",
            choices=tuple(SOLVERS),
        ),
    )
    variants = ("budget=0.5", "budget=1", "solver=heun")
    steps, recover = 0, "cache"  # the adjoint's options, fixed here

    @property
    def exact(self) -> bool:
        """At budget 1 the discrete rule steps over every sampler interval: the exact gradient on
        single-step samplers (checked by the conformance suite's budget=1 variant)."""
        return self.solver_class.discrete_adjoint and self.budget >= 1

    @property
    def convergence_order(self) -> float | None:
        return None  # at a fixed fraction of N the grid refines with N; no order is claimed

    def intervals(self, steps: int) -> int:
        """M = floor(budget N / stages): the budget's VJPs, at the solver's VJPs per interval."""
        return max(1, math.floor(self.budget * steps / self.solver_class.stages + 1e-9))

    def points(self, steps: int) -> list[int]:
        """Sampler grid indices of the coarse points, 0 and N included, spread evenly."""
        m = min(self.intervals(steps), steps)
        return sorted({round(j * steps / m) for j in range(m + 1)})

    def adjoint_steps(self, steps: int) -> int:
        return len(self.points(steps)) - 1

    def adjoint_grid(self, schedule) -> tuple[list[float], list[int] | None]:
        nodes = self.points(schedule.num_steps)
        return [schedule.ode_point(i) for i in nodes], nodes
