"""torchdiffeq-adjoint: torchdiffeq's `odeint_adjoint` on the probability-flow ODE in (s, y)
(bench/chain.py: s = rho for DDIM, s = sigma for flow-matching Euler), Euler on the sampler's
grid (docs/estimators/index.md): the off-the-shelf route that
AdjointDPM's reference code takes, held against the suite's own `adjoint`.

    dy/drho = eps(alpha(rho) y, t(rho), c),   alpha(rho) = 1 / sqrt(1 + rho^2),   y = x / alpha

One Euler step of this ODE from rho_i to rho_{i-1} is one DDIM step (eta = 0), so the forward
solve is the sampler (exactly where N divides the training steps; otherwise diffusers' DDIM
uses a previous timestep slightly off the grid, see bench/chain.py). In backward, torchdiffeq
integrates the augmented state [y, a_y, a_params] interval by interval and resets y to the
forward solution at every output time. With the sampler's grid as output times, that makes it
the cached-state adjoint: it equals `adjoint[recover=cache]` to rounding (measured 1e-15 on the
toy at N = 5, 10), not the state-recovering default `adjoint`, and the forward path it returns
holds N + 1 latents. Memory A + N*S, time NF + N(F + V). eta = 0 only; not
DPM-Solver++ 2M, whose multistep forward is no Euler solve."""

from __future__ import annotations

import bisect
import random

import torch
from torch import Tensor, nn

from bench.chain import Chain
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, require_graph


class ProbabilityFlow(nn.Module):
    """f(s, y) of the sampler's probability-flow ODE (bench/chain.py), with the model time read from
    the sampler's grid at its points."""

    def __init__(self, chain: Chain, cond: Tensor | None) -> None:
        super().__init__()
        self.chain, self.cond = chain, cond
        schedule = chain.schedule
        self.points = [schedule.ode_point(i) for i in range(schedule.num_steps + 1)]  # increasing in i
        self.times = [schedule.model_time(i) for i in range(schedule.num_steps + 1)]

    def model_time(self, s: float) -> float:
        """The grid's model time at a grid point (nearest: s may come back rounded to float32)."""
        i = bisect.bisect_left(self.points, s)
        candidates = [j for j in (i - 1, i) if 0 <= j < len(self.points)]
        nearest = min(candidates, key=lambda j: abs(self.points[j] - s))
        if abs(self.points[nearest] - s) > 1e-5 * max(1.0, abs(s)):
            return self.chain.schedule.ode_time(s)  # off the grid (a finer solver)
        return self.times[nearest]

    def forward(self, s: Tensor, y: Tensor) -> Tensor:
        value = float(s.detach())
        return self.chain.denoise_at(y * self.chain.schedule.ode_scale(value), self.model_time(value), self.cond)


class TorchdiffeqAdjoint(Estimator):
    name = "torchdiffeq-adjoint"
    plot_style = ("#d62728", "d")  # colour and marker in every figure
    summary = "torchdiffeq.odeint_adjoint, Euler on the sampler's rho grid (AdjointDPM's off-the-shelf route)"
    convergence_order = 1.0

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.chain.schedule.eta > 0:
            return "the probability-flow ODE is the deterministic sampler (eta = 0)"
        if problem.chain.schedule.history_size > 0:
            return (
                f"torchdiffeq's Euler forward is not the multistep sampler "
                f"{problem.chain.schedule.sampler}; use adjoint (it integrates the same ODE)"
            )
        return None

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(
            nfe_forward=2 * steps,
            nfe_vjp=steps,
            memory="A + N·S",
            activations=1,
            latents=steps,
            activations_at_reward=0,
            # torchdiffeq takes each VJP with retain_graph=True: the call's graph stays alive while
            # the VJP's buffers are allocated, about one call's working memory on top of A
            working=1,
        )

    def cost_for(self, problem: Problem) -> Cost:
        intervals = (
            len(distinct_points([problem.chain.schedule.ode_point(i) for i in range(problem.num_steps + 1)])) - 1
        )
        return self.cost(intervals, problem.target)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        from torchdiffeq import odeint_adjoint

        schedule = problem.chain.schedule
        flow = ProbabilityFlow(problem.chain, problem.cond)
        steps = schedule.num_steps
        # torchdiffeq needs strictly monotone times: an identity step (two grid points at one rho,
        # as leading spacing with steps_offset = 0 ends) is no interval of the ODE, so it is dropped.
        grid = torch.tensor(distinct_points(flow.points), dtype=torch.float64)
        y_start = problem.x_start / schedule.ode_scale(flow.points[steps])
        params = tuple(leaf for leaf in problem.leaves if leaf is not problem.x_start)
        path = odeint_adjoint(flow, y_start, grid.to(y_start.dtype), method="euler", adjoint_params=params)
        x0 = schedule.ode_scale(flow.points[0]) * path[-1]
        loss, rewards = problem.loss(x0)
        require_graph(loss)
        loss.backward()
        return Estimate(loss=float(loss.detach()), rewards=rewards.detach(), x0=x0.detach())


def distinct_points(points: list[float]) -> list[float]:
    """The grid's ODE points from s_N down to s_0, each once (strictly decreasing)."""
    out: list[float] = []
    for s in reversed(points):
        if not out or s != out[-1]:
            out.append(s)
    return out
