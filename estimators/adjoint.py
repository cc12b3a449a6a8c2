"""adjoint: AdjointDPM's continuous adjoint (arXiv 2307.10711; ESTIMATORS.md section 3), on the
probability-flow ODE of whichever sampler the task uses (bench/chain.py): y = x / scale(s),

    dy/ds = f(y, s) = out(scale(s) y, t(s), c)

(s = rho, scale = alpha, out = eps for DDIM and DPM-Solver++; s = sigma, scale = 1, out = the
velocity for flow-matching Euler). The augmented adjoint system, solved from s_0 up to s_N,

    d a_y / ds = -a_y^T df/dy,   d a_c / ds = -a_y^T df/dc,   d a_theta / ds = -a_y^T df/dtheta
    a_y(s_0) = scale(s_0) dL/dx_0,   a_c = a_theta = 0,   dL/dx_N = a_y(s_N) / scale(s_N)

is integrated by a `solver`, each a step of the whole augmented state Z = (y, a_y, a_c, a_theta):

- euler (order 1): Z += h G(Z, s). The VJP is taken at the clean end of each interval (the exact
  discrete adjoint of DDIM takes it at the noisy end), so it is off by O(h).
- discrete: Z += h G(Z at s with y from s + h), the VJP at the interval's noisy end with the
  adjoint from its clean end. With recover=cache, on the sampler's own grid (steps = 0), this is
  the exact discrete adjoint of a single-step sampler (DDIM, flow-matching Euler, DPM-Solver++ at
  order 1): the chain's exact gradient, in constant activation memory plus the N cached states
  (`exact`, checked by the conformance suite). With recover=backward (the default) the states
  are recovered by running each step backwards from x_0, which is exact only for a model linear
  in x: for a nonlinear model they drift, and the gradient is first order in N like euler's
  (`convergence_order`, checked). For the mode with sigma J = I (high noise) its factor
  1 - (1 - rho_a / rho_b) = e^{-du} is exact at any step. Not exact on a multistep sampler
  (dpmpp2m at order 2), whose step is not the interval's Euler step.
- heun (order 2, explicit trapezoid): K1 = G(Z, s), K2 = G(Z + h K1, s + h), Z += h (K1 + K2) / 2.
- dpm2 (order 2, AdjointDPM's exponential integrator, DPM-Solver-2): in y and s the ODE has no
  linear part, so the exponential integrator reduces to a midpoint rule whose midpoint s_m is
  halfway in lambda = log(alpha / sigma): Z += h G(Z + (s_m - s) G(Z, s), s_m).
- ab2 (order 2 at one evaluation per step; in none of the suite's papers): a two-step
  Adams-Bashforth rule in lambda, the adjoint's analogue of DPM-Solver++ 2M: G taken linear in
  lambda through the last two points and integrated exactly in s over the next interval (Gauss
  quadrature of the scalar lambda(s)), so each step reuses the last step's VJP. Where lambda is
  infinite (sigma = 0 or 1) and at the first step it takes Euler (O(h^2) once: still order 2).

The orders are measured by tests/test_adjoint_solvers.py: the slope of the error against the
number of adjoint steps M, with the forward fixed, against a converged reference.

Options: `steps` (0: the sampler's own grid; M > 0: M steps uniform in lambda = log(alpha / sigma)
between the same end points, with fixed end intervals where lambda is infinite or the model's time
stops: `Schedule.ode_grid`), `solver`, and `recover` (backward: re-integrate y alongside the adjoint, constant
memory plus drift; cache: keep the forward states, N*S memory, no drift, what the reference code
amounts to; between states y is interpolated linearly in s). Needs a deterministic sampler (eta =
0). Memory A (+ N*S cached), time about NF + kM(F + V), k the solver's stages (1 or 2).
"""
from __future__ import annotations

import bisect
import math
import random

import torch
from torch import Tensor

from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, write_gradients

SOLVERS = {"euler": (1, 1), "discrete": (1, 1), "heun": (2, 2), "dpm2": (2, 2), "ab2": (2, 1)}  # name -> (order, stages)


class Adjoint(Estimator):
    name = "adjoint"
    summary = "continuous adjoint ODE of the sampler's probability flow (AdjointDPM)"
    options = (
        Option("steps", int, 0, "adjoint steps (0: the sampler's own grid)",
               check=at_least(0, " (0: the sampler's grid)")),
        Option("recover", str, "backward", "how states are recovered: backward (O(1) memory) or cache",
               choices=("backward", "cache")),
        Option("solver", str, "euler", "adjoint ODE solver: euler (order 1), discrete (the VJP at "
               "the noisy end: with recover=cache and steps=0 the chain's exact gradient on single-step "
               "samplers; order 1 with recover=backward), heun (2), dpm2 (2, AdjointDPM's "
               "exponential integrator), ab2 (2, one VJP per step)", choices=tuple(SOLVERS)),
    )
    variants = ("recover=cache", "steps=7", "steps=7,recover=cache", "solver=heun", "solver=dpm2,recover=cache",
                "solver=discrete", "solver=discrete,recover=cache", "solver=ab2,steps=9")

    @property
    def solver_order(self) -> int:
        """The solver's order in the adjoint step size (forward fixed)."""
        return SOLVERS[self.solver][0]

    @property
    def exact(self) -> bool:
        """solver=discrete through the cached states on the sampler's own grid: the chain's exact
        discrete adjoint (on single-step samplers; the conformance suite's toy samples with DDIM)."""
        return self.solver == "discrete" and self.recover == "cache" and self.steps == 0

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

    def cost(self, steps: int, target: str) -> Cost:
        evaluations = (self.steps or steps) * SOLVERS[self.solver][1]
        # discrete without cache: one forward at x_0 starts the recovery of y
        start = 1 if self.solver == "discrete" and self.recover == "backward" else 0
        return Cost(nfe_forward=steps + evaluations + start, nfe_vjp=evaluations,
                    memory="A" if self.recover == "backward" else "A + N·S", activations=1,
                    latents=0 if self.recover == "backward" else steps)

    def adjoint_grid(self, schedule) -> tuple[list[float], list[int] | None]:
        """The adjoint's points s_0 < ... < s_M and, where they are sampler grid points, their
        sampler indices (there the model time is the sampler's and cached states are exact)."""
        grid = schedule.ode_grid(self.steps)
        on_sampler_grid = len(grid) == schedule.num_steps + 1
        return grid, (list(range(len(grid))) if on_sampler_grid else None)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        steps = schedule.num_steps
        cache = self.recover == "cache"
        if cache:
            x0, states = chain.sample(problem.x_start, cond, keep_states=True)
            grid_s = [schedule.ode_point(i) for i in range(steps + 1)]
            ys = [states[steps - i] / schedule.ode_scale(grid_s[i]) for i in range(steps + 1)]
            del states
        else:
            x0, ys = chain.sample(problem.x_start, cond), None
        x0_var = x0.detach().requires_grad_(True)
        loss, rewards = problem.loss(x0_var)
        (grad_x0,) = torch.autograd.grad(loss, x0_var)

        grid, nodes = self.adjoint_grid(schedule)
        params = [leaf for leaf in problem.leaves if leaf is not problem.x_start]

        def time_at(s: float, j: int | None) -> float:
            node = nodes[j] if nodes is not None and j is not None else None
            return schedule.model_time(node) if node is not None else schedule.ode_time(s)

        def cached_y(s: float, j: int | None) -> Tensor:
            if nodes is not None and j is not None:
                return ys[nodes[j]]
            i = min(max(bisect.bisect_left(grid_s, s), 1), steps)
            if grid_s[i] == grid_s[i - 1]:  # an identity step: both grid points hold the same state
                return ys[i]
            w = (s - grid_s[i - 1]) / (grid_s[i] - grid_s[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])

        def rate(z: list[Tensor], s: float, node: int | None) -> list[Tensor]:
            """G(Z, s): the augmented system's derivative (dy/ds, d a_y/ds, d a_params/ds)."""
            y = cached_y(s, node) if cache else z[0]
            f, vjps = drift_and_vjp(chain, y, schedule.ode_scale(s), time_at(s, node), cond, z[1], params)
            return [f.detach(), *(-v if v is not None else torch.zeros_like(a) for v, a in zip(vjps, z[1:]))]

        def moved(z: list[Tensor], h: float, k: list[Tensor]) -> list[Tensor]:
            return [a + h * b for a, b in zip(z, k)]

        z = [x0.detach() / schedule.ode_scale(grid[0]), schedule.ode_scale(grid[0]) * grad_x0,
             *(torch.zeros_like(p) for p in params)]
        previous = None  # ab2: the last point's rate
        drift = None  # discrete: dy/ds at the clean end, to move y to each noisy end
        if self.solver == "discrete" and not cache:
            with torch.no_grad():
                drift = chain.denoise_at(z[0] * schedule.ode_scale(grid[0]), time_at(grid[0], 0), cond)
        for j in range(1, len(grid)):
            s, h = grid[j - 1], grid[j] - grid[j - 1]
            if self.solver == "discrete":
                if not cache:
                    z[0] = z[0] + h * drift
                k1 = rate(z, grid[j], j)  # the VJP at the noisy end, the adjoint from the clean end
                z = [z[0], *(a + h * b for a, b in zip(z[1:], k1[1:]))]
                drift = k1[0]
                continue
            k1 = rate(z, s, j - 1)
            weight = lambda_moment(schedule, grid[j - 2], s, grid[j]) if self.solver == "ab2" and j >= 2 else None
            if self.solver == "euler" or (self.solver == "ab2" and weight is None):
                z = moved(z, h, k1)
                previous = k1
            elif self.solver == "ab2":  # the rate linear in lambda through the last two points
                z = [a + h * b + weight * (b - c) for a, b, c in zip(z, k1, previous)]
                previous = k1
            elif self.solver == "heun":
                k2 = rate(moved(z, h, k1), grid[j], j)
                z = [a + 0.5 * h * (b + c) for a, b, c in zip(z, k1, k2)]
            else:  # dpm2
                s_mid = schedule.ode_lambda_midpoint(s, grid[j])
                z = moved(z, h, rate(moved(z, s_mid - s, k1), s_mid, None))
        write_gradients(problem, z[1] / schedule.ode_scale(grid[-1]), z[2:])
        return Estimate(loss=float(loss.detach()), rewards=rewards.detach(), x0=x0.detach())


_GAUSS = ((-0.9602898564975363, 0.1012285362903763), (-0.7966664774136267, 0.2223810344533745),
          (-0.5255324099163290, 0.3137066458778873), (-0.1834346424956498, 0.3626837833783620),
          (0.1834346424956498, 0.3626837833783620), (0.5255324099163290, 0.3137066458778873),
          (0.7966664774136267, 0.2223810344533745), (0.9602898564975363, 0.1012285362903763))


def lambda_moment(schedule, before: float, a: float, b: float) -> float | None:
    """W with int_a^b G ds = (b - a) G(a) + W (G(a) - G(before)) when G is linear in
    lambda = -log rho through the points before and a: W = int_a^b (l(s) - l(a)) ds / (l(a) - l(before)).
    None where lambda is infinite or repeats (an end point, an identity step): take Euler there."""
    lam = [-math.log(r) if 0 < r < math.inf else None for r in map(schedule.ode_to_rho, (before, a, b))]
    if None in lam or lam[1] == lam[0] or b == a:
        return None
    half, middle = (b - a) / 2, (a + b) / 2
    integral = sum(w * (-math.log(schedule.ode_to_rho(middle + half * x)) - lam[1]) for x, w in _GAUSS) * half
    return integral / (lam[1] - lam[0])


def drift_and_vjp(chain, y: Tensor, scale: float, t: float, cond: Tensor | None,
                  a_y: Tensor, params: list[Tensor]) -> tuple[Tensor, tuple]:
    """The ODE's drift f = out(scale y, t, c) and the adjoint's VJPs a_y^T df/dy, a_y^T
    df/dparams: one evaluation of the augmented system."""
    y_var = y.detach().requires_grad_(True)
    with torch.enable_grad():
        f = chain.denoise_at(y_var * scale, t, cond)
        vjps = torch.autograd.grad(f, [y_var, *params], grad_outputs=a_y, allow_unused=True)
    return f, vjps
