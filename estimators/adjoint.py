"""adjoint: AdjointDPM's continuous adjoint (arXiv 2307.10711), on the probability-flow ODE of
whichever sampler the task uses (bench/chain.py). In the variable y = x / scale(s) the ODE is

    dy/ds = f(y, s) = out(scale(s) y, t(s), c)

(s = rho = sigma / alpha, scale = alpha, out = eps for DDIM and DPM-Solver++; s = sigma, scale = 1,
out = the velocity for flow-matching Euler). The sampler runs it from s_N (noise) down to s_0
(x_0). The gradient of L(x_0) runs back up: the augmented adjoint system, from s_0 to s_N,

    d a_y / ds = -a_y^T df/dy,   d a_c / ds = -a_y^T df/dc,   d a_theta / ds = -a_y^T df/dtheta
    a_y(s_0) = scale(s_0) dL/dx_0,   a_c(s_0) = a_theta(s_0) = 0,
    dL/dx_N = a_y(s_N) / scale(s_N),   dL/dc = a_c(s_N),   dL/dtheta = a_theta(s_N),

integrated together with y itself (dy/ds = f) as one state Z = (y, a_y, a_c, a_theta) whose rate
G(Z, s) = (f, -a_y^T df/dy, -a_y^T df/dc, -a_y^T df/dtheta) costs one forward and one VJP
(`drift_and_vjp`). `estimate` is one loop over the adjoint's grid s_0 < ... < s_M, one step of the
chosen `solver` per interval; the step rules, their orders and their costs are in
estimators/adjoint_solvers.py (euler, discrete, heun, dpm2, ab2).

Options: `steps` (0: the sampler's own grid; M > 0: M steps uniform in lambda = log(alpha / sigma)
between the same end points, with fixed end intervals where lambda is infinite or the model's time
stops: `Schedule.ode_grid`), `solver`, and `recover` (backward: y is integrated alongside the
adjoint from y(s_0) = x_0 / scale(s_0), constant memory, but off the forward's states by the
solver's error; cache: keep the N forward states, N*S memory, no drift, what the reference code
amounts to; between states y is interpolated linearly in s). On the sampler's grid with cached
states the model time at a grid point is the sampler's own. Needs a deterministic sampler
(eta = 0). Memory A (+ N*S cached), time about NF + kM(F + V), k the solver's stages.

Exactness: a solver whose step is the discrete adjoint step (discrete), through the cached states
on the sampler's own grid, gives the chain's exact gradient on single-step samplers (`exact`,
required by the conformance suite). Otherwise on the sampler's grid (steps = 0) the error falls at
least like 1/N (the N-step chain is itself a first-order discretisation of the ODE;
`convergence_order`, checked); at a fixed M > 0 it does not converge to the chain's gradient.
"""

from __future__ import annotations

import bisect
import random

import torch
from torch import Tensor

from bench.options import Option, at_least
from bench.problem import Problem
from estimators.adjoint_solvers import SOLVERS, AdjointSolver, Interval, solver_help
from estimators.base import Cost, Estimate, Estimator, write_gradients

__all__ = ["SOLVERS", "Adjoint", "AugmentedFlow", "drift_and_vjp", "solver_option"]


def solver_option(default: str, lead: str) -> Option:
    """The `solver` option: one of the registered solvers (estimators/adjoint_solvers.py)."""
    return Option("solver", str, default, solver_help(lead), choices=tuple(SOLVERS))


class Adjoint(Estimator):
    name = "adjoint"
    plot_style = ("#1f77b4", "D")  # colour and marker in every figure
    summary = "continuous adjoint ODE of the sampler's probability flow (AdjointDPM)"
    options = (
        Option(
            "steps", int, 0, "adjoint steps (0: the sampler's own grid)", check=at_least(0, " (0: the sampler's grid)")
        ),
        Option(
            "recover",
            str,
            "backward",
            "how states are recovered: backward (O(1) memory) or cache",
            choices=("backward", "cache"),
        ),
        solver_option("euler", "adjoint ODE solver: "),
    )
    variants = (
        "recover=cache",
        "steps=7",
        "steps=7,recover=cache",
        "solver=heun",
        "solver=dpm2,recover=cache",
        "solver=discrete",
        "solver=discrete,recover=cache",
        "solver=ab2,steps=9",
    )

    @property
    def solver_class(self) -> type[AdjointSolver]:
        return SOLVERS[self.solver]

    @property
    def solver_order(self) -> int:
        """The solver's order in the adjoint step size (forward fixed)."""
        return self.solver_class.order

    def code_objects(self) -> tuple:
        return (self.solver_class,)  # resolved by name: a plug-in's solver is in the key too

    @property
    def exact(self) -> bool:
        """The discrete adjoint step through the cached states on the sampler's own grid: the
        chain's exact gradient (on single-step samplers; the conformance suite's toy samples with
        DDIM)."""
        return self.solver_class.discrete_adjoint and self.recover == "cache" and self.steps == 0

    @property
    def convergence_order(self) -> float | None:
        """At least first order in N on the sampler's own grid (the N-step chain itself is a
        first-order discretisation of the ODE; discrete with backward recovery drifts at that
        order too); a fixed M does not converge to the chain's gradient; exact: no order."""
        return 1.0 if self.steps == 0 and not self.exact else None

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.chain.schedule.eta > 0:
            return "the adjoint ODE needs the deterministic sampler (eta = 0)"
        return None

    def adjoint_steps(self, steps: int) -> int:
        """M, the number of intervals of the adjoint grid on an N-step chain."""
        return self.steps or steps

    def adjoint_grid(self, schedule) -> tuple[list[float], list[int] | None]:
        """The adjoint's points s_0 < ... < s_M and, where they are sampler grid points, their
        sampler indices (there the model time is the sampler's and cached states are exact)."""
        grid = schedule.ode_grid(self.steps)
        on_sampler_grid = len(grid) == schedule.num_steps + 1
        return grid, (list(range(len(grid))) if on_sampler_grid else None)

    def cost(self, steps: int, target: str) -> Cost:
        recovers = self.recover == "backward"
        evaluations = self.adjoint_steps(steps) * self.solver_class.stages
        start = self.solver_class.extra_forwards(recovers)
        return Cost(
            nfe_forward=steps + evaluations + start,
            nfe_vjp=evaluations,
            memory="A" if recovers else "A + N·S",
            activations=1,
            latents=0 if recovers else steps,
            activations_at_reward=0,
        )

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule = problem.chain, problem.chain.schedule
        grid, nodes = self.adjoint_grid(schedule)
        if self.recover == "cache":
            x0, states = chain.sample(problem.x_start, problem.cond, keep_states=True)
        else:
            x0, states = chain.sample(problem.x_start, problem.cond), None
        flow = AugmentedFlow(problem, nodes, states)
        del states
        x0_var = x0.detach().requires_grad_(True)
        loss, rewards = problem.loss(x0_var)
        (grad_x0,) = torch.autograd.grad(loss, x0_var)

        solver = self.solver_class(flow)
        z = [
            x0.detach() / schedule.ode_scale(grid[0]),
            schedule.ode_scale(grid[0]) * grad_x0,
            *(torch.zeros_like(p) for p in flow.params),
        ]
        for j in range(1, len(grid)):
            z = solver.step(z, Interval(grid[j - 1], grid[j], j - 1, j))
        write_gradients(problem, z[1] / schedule.ode_scale(grid[-1]), z[2:])
        return Estimate(loss=float(loss.detach()), rewards=rewards.detach(), x0=x0.detach())


class AugmentedFlow:
    """The augmented system of one gradient call, as the solvers see it (adjoint_solvers.Flow):
    its rate G(Z, s) and drift f(y, s), at adjoint grid points (`node`, an index into the grid
    whose sampler indices are `nodes`) or between them (node None). With the forward's states
    (recover=cache) y is read from them, linearly interpolated in s off the sampler's grid, and
    the state's own y is ignored; without, y is the state's (`recovers`)."""

    def __init__(self, problem: Problem, nodes: list[int] | None, states: list[Tensor] | None) -> None:
        self.chain, self.schedule, self.cond = problem.chain, problem.chain.schedule, problem.cond
        self.params = [leaf for leaf in problem.leaves if leaf is not problem.x_start]
        self.nodes = nodes
        self.recovers = states is None
        if states is not None:  # states[k] is x_{N-k}: y at the sampler's points, i = 0..N
            steps = self.schedule.num_steps
            self.points = [self.schedule.ode_point(i) for i in range(steps + 1)]
            self.ys = [states[steps - i] / self.schedule.ode_scale(self.points[i]) for i in range(steps + 1)]

    def sampler_index(self, node: int | None) -> int | None:
        return self.nodes[node] if self.nodes is not None and node is not None else None

    def time(self, s: float, node: int | None) -> float:
        index = self.sampler_index(node)
        return self.schedule.model_time(index) if index is not None else self.schedule.ode_time(s)

    def cached_y(self, s: float, node: int | None) -> Tensor:
        index = self.sampler_index(node)
        if index is not None:
            return self.ys[index]
        i = min(max(bisect.bisect_left(self.points, s), 1), len(self.points) - 1)
        if self.points[i] == self.points[i - 1]:  # an identity step: both grid points hold the same state
            return self.ys[i]
        w = (s - self.points[i - 1]) / (self.points[i] - self.points[i - 1])
        return self.ys[i - 1] + w * (self.ys[i] - self.ys[i - 1])

    def rate(self, z: list[Tensor], s: float, node: int | None) -> list[Tensor]:
        """G(Z, s): the augmented system's derivative (dy/ds, d a_y/ds, d a_params/ds)."""
        y = z[0] if self.recovers else self.cached_y(s, node)
        f, vjps = drift_and_vjp(
            self.chain, y, self.schedule.ode_scale(s), self.time(s, node), self.cond, z[1], self.params
        )
        return [f.detach(), *(-v if v is not None else torch.zeros_like(a) for v, a in zip(vjps, z[1:]))]

    def drift(self, y: Tensor, s: float, node: int | None) -> Tensor:
        """f(y, s), one forward without graph."""
        with torch.no_grad():
            return self.chain.denoise_at(y * self.schedule.ode_scale(s), self.time(s, node), self.cond)


def drift_and_vjp(
    chain, y: Tensor, scale: float, t: float, cond: Tensor | None, a_y: Tensor, params: list[Tensor]
) -> tuple[Tensor, tuple]:
    """The ODE's drift f = out(scale y, t, c) and the adjoint's VJPs a_y^T df/dy, a_y^T
    df/dparams: one evaluation of the augmented system."""
    y_var = y.detach().requires_grad_(True)
    with torch.enable_grad():
        f = chain.denoise_at(y_var * scale, t, cond)
        vjps = torch.autograd.grad(f, [y_var, *params], grad_outputs=a_y, allow_unused=True)
    return f, vjps
