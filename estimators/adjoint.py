"""adjoint: AdjointDPM's continuous adjoint (arXiv 2307.10711; ESTIMATORS.md section 3).

In y = x / alpha, rho = sigma / alpha the sampler is Euler on dy/drho = f(y, rho) =
eps(alpha(rho) y, t(rho), c). The augmented adjoint ODE, solved from rho_0 up to rho_N,

    d a_y / d rho = -a_y^T df/dy,   d a_c / d rho = -a_y^T df/dc,   d a_theta / d rho = -a_y^T df/dtheta
    a_y(rho_0) = alpha_0 dL/dx_0,   a_c = a_theta = 0,   dL/dx_N = a_y(rho_N) / alpha_N

is integrated with Euler, the VJP taken at the clean end of each interval (the exact discrete
adjoint takes it at the noisy end: this estimator is off by O(h), and converges as N grows).

Options: `steps` (0: the sampler's own rho grid; M > 0: M Euler steps on a grid interpolated
from the sampler's, with the same end points), and `recover` (backward: re-integrate y
alongside the adjoint, constant memory plus drift; cache: keep the forward states, N*S memory,
no drift, what the reference code amounts to). Needs the deterministic sampler (eta = 0).
Memory A (+ N*S cached), time about NF + M(F + V).
"""
from __future__ import annotations

import bisect
import math
import random

import torch

from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, write_gradients


class Adjoint(Estimator):
    name = "adjoint"
    summary = "continuous adjoint ODE in (rho, y), Euler (AdjointDPM)"
    options = (
        Option("steps", int, 0, "adjoint Euler steps (0: the sampler's own grid)",
               check=at_least(0, " (0: the sampler's grid)")),
        Option("recover", str, "backward", "how states are recovered: backward (O(1) memory) or cache",
               choices=("backward", "cache")),
    )
    variants = ("recover=cache", "steps=7", "steps=7,recover=cache")

    @property
    def convergence_order(self) -> float | None:
        """First order in N on the sampler's own grid (Euler, VJP at the clean end); a fixed M
        does not converge to the N-step chain's gradient."""
        return 1.0 if self.steps == 0 else None

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.chain.schedule.eta > 0:
            return "the adjoint ODE needs the deterministic sampler (eta = 0)"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        m = self.steps or steps
        return Cost(nfe_forward=steps + m, nfe_vjp=m,
                    memory="A" if self.recover == "backward" else "A + N·S", activations=1,
                    latents=0 if self.recover == "backward" else steps)

    def adjoint_grid(self, steps: int, rhos: list[float]) -> list[float]:
        """rho values of the adjoint's grid, increasing from rho_0 to rho_N. With M steps, the
        sampler's grid is interpolated at fractional indices j N / M."""
        m = self.steps or steps
        grid = []
        for j in range(m + 1):
            u = j * steps / m
            lo = min(int(math.floor(u)), steps - 1)
            grid.append(rhos[lo] + (u - lo) * (rhos[lo + 1] - rhos[lo]))
        return grid

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        steps = schedule.num_steps
        cache = self.recover == "cache"
        if cache:
            x0, states = chain.sample(problem.x_start, cond, keep_states=True)
        else:
            x0, states = chain.sample(problem.x_start, cond), None

        x0_var = x0.detach().requires_grad_(True)
        loss, rewards = problem.loss(x0_var)
        (grad_x0,) = torch.autograd.grad(loss, x0_var)

        rhos = [schedule.rho(i) for i in range(steps + 1)]
        grid = self.adjoint_grid(steps, rhos)
        on_sampler_grid = len(grid) == steps + 1
        # Cached forward states in y, by grid index i (the Euler path is linear in rho between them).
        ys = None
        if states is not None:  # y_i = x_i / alpha_i, by grid index i; the x states are dropped
            ys = [states[steps - i] / schedule.alpha(i) for i in range(steps + 1)]
            del states

        def cached_y(rho: float) -> torch.Tensor:
            i = min(max(bisect.bisect_left(rhos, rho), 1), steps)
            if rhos[i] == rhos[i - 1]:  # an identity step: both grid points hold the same state
                return ys[i]
            w = (rho - rhos[i - 1]) / (rhos[i] - rhos[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])

        params = [leaf for leaf in problem.leaves if leaf is not problem.x_start]
        a_y = schedule.alpha(0) * grad_x0
        a_params = [torch.zeros_like(p) for p in params]
        y = x0.detach() / schedule.alpha(0)
        for j in range(1, len(grid)):
            rho, h = grid[j - 1], grid[j] - grid[j - 1]
            if cache:
                y = ys[j - 1] if on_sampler_grid else cached_y(rho)
            t = schedule.model_time(j - 1) if on_sampler_grid else schedule.time_at_rho(rho)
            f, vjps = drift_and_vjp(chain, y, rho, t, cond, a_y, params)
            a_y = a_y - h * vjps[0]
            for acc, vjp in zip(a_params, vjps[1:]):
                if vjp is not None:
                    acc.sub_(h * vjp)
            if not cache:
                y = y + h * f.detach()

        write_gradients(problem, a_y / schedule.alpha(steps), a_params)
        return Estimate(loss=float(loss.detach()), rewards=rewards.detach(), x0=x0.detach())


def drift_and_vjp(chain, y: torch.Tensor, rho: float, t: float, cond: torch.Tensor | None,
                  a_y: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
    """The ODE's drift f = eps(alpha(rho) y, t, c), alpha(rho) = 1/sqrt(1 + rho^2), and the
    adjoint's VJPs a_y^T df/dy, a_y^T df/dparams: one step of the augmented system."""
    y_var = y.detach().requires_grad_(True)
    with torch.enable_grad():
        f = chain.denoise_at(y_var / math.sqrt(1 + rho * rho), t, cond)
        vjps = torch.autograd.grad(f, [y_var, *params], grad_outputs=a_y, allow_unused=True)
    return f, vjps
