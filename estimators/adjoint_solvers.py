"""The adjoint's ODE solvers: the step rules that `adjoint` and `coarse-adjoint` integrate the
augmented system with (estimators/adjoint.py, whose docstring states the system). Each rule is a
class with its order (in the adjoint's step size, the forward held fixed), its stages (VJP
evaluations per step) and a `step` that advances Z = (y, a_y, a_params) over one interval
[s_a, s_b] of width h = s_b - s_a, given the system's rate G(Z, s) and drift f(y, s). One
instance serves one gradient call, so a rule's memory between steps (the last rate, a drift) is
its own, not the loop's. Adding a rule is a class here, listed in SOLVERS (or `register_solver`
from a plug-in); the estimators' `solver` option offers every name in SOLVERS.

- euler (order 1): Z_b = Z_a + h G(Z_a, s_a). The VJP is taken at the clean end of the interval
  while the exact discrete adjoint of DDIM takes it at the noisy end, so it is off by O(h).
- discrete (order 1): the VJP at the noisy end s_b, the adjoint carried from the clean end:
  a_b = a_a + h (-a_a^T df/d(y, params))(y_b, s_b), the drift at s_b kept for the next step. With
  the states cached, on the sampler's own grid, this is the exact discrete adjoint of a
  single-step sampler (DDIM, flow-matching Euler, DPM-Solver++ at order 1), hence
  `discrete_adjoint`. With y recovered (recover=backward) y_b is y_a + h f(y_a, s_a), the
  sampler's step run backwards from x_0: exact only for a model linear in y, otherwise y drifts
  and the gradient is first order in N like euler's. It costs one forward more, f at x_0 before
  the first step. Where sigma J = I (the high-noise mode) its factor 1 - (1 - rho_a / rho_b) =
  rho_a / rho_b = e^{-du} is exact at any width. Not exact on a multistep sampler (dpmpp2m at
  order 2), whose step is not the interval's Euler step.
- heun (order 2, the explicit trapezoid): K1 = G(Z_a, s_a), K2 = G(Z_a + h K1, s_b),
  Z_b = Z_a + h (K1 + K2) / 2.
- dpm2 (order 2, AdjointDPM's exponential integrator, DPM-Solver-2): in the variables y and s the
  ODE has no linear part left, so the exponential integrator is a midpoint rule whose midpoint s_m
  is halfway between s_a and s_b in lambda = log(alpha / sigma):
  Z_b = Z_a + h G(Z_a + (s_m - s_a) G(Z_a, s_a), s_m).
- ab2 (order 2 at one VJP per step; in none of the suite's papers): two-step Adams-Bashforth in
  lambda, the adjoint's counterpart of DPM-Solver++ 2M. G is taken linear in lambda through the
  previous point s_p and s_a, and that line is integrated exactly in s over [s_a, s_b]:
  Z_b = Z_a + h G_a + W (G_a - G_p), W = int_{s_a}^{s_b} (lambda(s) - lambda_a) ds / (lambda_a - lambda_p)
  (`lambda_moment`, by Gauss quadrature of the scalar lambda(s)). Each step reuses the previous
  step's rate. At the first step, and where lambda is infinite (sigma = 0 or alpha = 0) or
  repeats, it takes an Euler step: an O(h^2) error a bounded number of times, still order 2.

The orders are measured by tests/plugins/estimators/test_adjoint_solvers.py.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple, Protocol

from torch import Tensor

State = list  # Z = [y, a_y, *a_params], one tensor each


class Flow(Protocol):
    """What a solver steps: the augmented system of one gradient call (estimators/adjoint.py)."""

    schedule: object  # bench.chain.Schedule: lambda(s) via ode_to_rho, ode_lambda_midpoint
    recovers: bool  # y is integrated with the adjoint (recover=backward), not read from cached states

    def rate(self, z: State, s: float, node: int | None) -> State:
        """G(Z, s) = (dy/ds, d a_y/ds, d a_params/ds): one forward and one VJP. `node` is the
        adjoint grid index of s where s is a grid point, else None."""

    def drift(self, y: Tensor, s: float, node: int | None) -> Tensor:
        """f(y, s) = dy/ds alone: one forward, no VJP."""


class Interval(NamedTuple):
    """One step of the adjoint: from s = start (grid index first) to s = end (grid index last)."""

    start: float
    end: float
    first: int
    last: int

    @property
    def width(self) -> float:
        return self.end - self.start


def moved(z: State, h: float, k: State) -> State:
    """Z + h K, part by part."""
    return [a + h * b for a, b in zip(z, k)]


class AdjointSolver:
    """One rule for the augmented system. Subclasses set the class attributes and `step`; an
    instance lives for one gradient call and keeps whatever it needs between steps."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0  # the error falls like h^order in the adjoint's step size
    stages: ClassVar[int] = 0  # rate evaluations (forward + VJP) per step
    note: ClassVar[str] = ""  # what the solver option's help says of it, after the name
    # True: through cached states on the sampler's own grid, the step is the exact discrete adjoint
    # step of a single-step sampler (its gradient is the chain's to rounding)
    discrete_adjoint: ClassVar[bool] = False

    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    @classmethod
    def extra_forwards(cls, recovers: bool) -> int:
        """Forwards per gradient call beyond `stages` per step (for the cost model)."""
        return 0

    def step(self, z: State, interval: Interval) -> State:
        raise NotImplementedError


class Euler(AdjointSolver):
    name, order, stages, note = "euler", 1, 1, "order 1"

    def step(self, z: State, interval: Interval) -> State:
        return moved(z, interval.width, self.flow.rate(z, interval.start, interval.first))


class Discrete(AdjointSolver):
    name, order, stages = "discrete", 1, 1
    note = (
        "the VJP at the noisy end: with recover=cache and steps=0 the chain's exact gradient on "
        "single-step samplers; order 1 with recover=backward"
    )
    discrete_adjoint = True

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow)
        self.drift: Tensor | None = None  # dy/ds at the current clean end, to move y to the noisy end

    @classmethod
    def extra_forwards(cls, recovers: bool) -> int:
        return 1 if recovers else 0  # f at x_0 starts the recovery of y

    def step(self, z: State, interval: Interval) -> State:
        h, y = interval.width, z[0]
        if self.flow.recovers:
            if self.drift is None:
                self.drift = self.flow.drift(y, interval.start, interval.first)
            y = y + h * self.drift
        k = self.flow.rate([y, *z[1:]], interval.end, interval.last)
        self.drift = k[0]
        return [y, *(a + h * b for a, b in zip(z[1:], k[1:]))]


class Heun(AdjointSolver):
    name, order, stages, note = "heun", 2, 2, "2"

    def step(self, z: State, interval: Interval) -> State:
        h = interval.width
        k1 = self.flow.rate(z, interval.start, interval.first)
        k2 = self.flow.rate(moved(z, h, k1), interval.end, interval.last)
        return [a + 0.5 * h * (b + c) for a, b, c in zip(z, k1, k2)]


class DPM2(AdjointSolver):
    name, order, stages, note = "dpm2", 2, 2, "2, AdjointDPM's exponential integrator"

    def step(self, z: State, interval: Interval) -> State:
        s = interval.start
        k1 = self.flow.rate(z, s, interval.first)
        s_mid = self.flow.schedule.ode_lambda_midpoint(s, interval.end)
        return moved(z, interval.width, self.flow.rate(moved(z, s_mid - s, k1), s_mid, None))


class AB2(AdjointSolver):
    name, order, stages, note = "ab2", 2, 1, "2, one VJP per step"

    def __init__(self, flow: Flow) -> None:
        super().__init__(flow)
        self.previous: tuple[float, State] | None = None  # (s, G) at the last step's start

    def step(self, z: State, interval: Interval) -> State:
        s, h = interval.start, interval.width
        k = self.flow.rate(z, s, interval.first)
        weight = None
        if self.previous is not None:
            weight = lambda_moment(self.flow.schedule, self.previous[0], s, interval.end)
        if weight is None:
            z = moved(z, h, k)
        else:  # the rate linear in lambda through the last two points
            z = [a + h * b + weight * (b - c) for a, b, c in zip(z, k, self.previous[1])]
        self.previous = (s, k)
        return z


SOLVERS: dict[str, type[AdjointSolver]] = {cls.name: cls for cls in (Euler, Discrete, Heun, DPM2, AB2)}


def register_solver(cls: type[AdjointSolver]) -> type[AdjointSolver]:
    """Add a solver class to the table (a decorator). The estimators read the table's names into
    their `solver` option's choices when their module is imported: register before that (a
    plug-in importing only this module), or rebuild the option (as tests/plugins/estimators/test_adjoint_solvers.py
    does for its midpoint rule)."""
    if not (cls.name and cls.order > 0 and cls.stages > 0):
        raise ValueError(f"{cls.__name__}: a solver needs a name, an order and a number of stages")
    if cls.name in SOLVERS and SOLVERS[cls.name] is not cls:
        raise ValueError(f"solver {cls.name!r} is registered already")
    SOLVERS[cls.name] = cls
    return cls


def solver_help(lead: str) -> str:
    """The solver option's help: `lead`, then each registered solver with its note."""
    return lead + ", ".join(f"{name} ({cls.note})" if cls.note else name for name, cls in SOLVERS.items())


_GAUSS = (
    (-0.9602898564975363, 0.1012285362903763),
    (-0.7966664774136267, 0.2223810344533745),
    (-0.5255324099163290, 0.3137066458778873),
    (-0.1834346424956498, 0.3626837833783620),
    (0.1834346424956498, 0.3626837833783620),
    (0.5255324099163290, 0.3137066458778873),
    (0.7966664774136267, 0.2223810344533745),
    (0.9602898564975363, 0.1012285362903763),
)


def lambda_moment(schedule, before: float, a: float, b: float) -> float | None:
    """W with int_a^b G ds = (b - a) G(a) + W (G(a) - G(before)) when G is linear in
    lambda = -log rho through the points before and a: W = int_a^b (l(s) - l(a)) ds / (l(a) - l(before)),
    by 8-point Gauss-Legendre quadrature. None where lambda is infinite or repeats (an end point, an
    identity step): take Euler there."""
    lam = [-math.log(r) if 0 < r < math.inf else None for r in map(schedule.ode_to_rho, (before, a, b))]
    if None in lam or lam[1] == lam[0] or b == a:
        return None
    half, middle = (b - a) / 2, (a + b) / 2
    integral = sum(w * (-math.log(schedule.ode_to_rho(middle + half * x)) - lam[1]) for x, w in _GAUSS) * half
    return integral / (lam[1] - lam[0])
