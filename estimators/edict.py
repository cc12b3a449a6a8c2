"""edict: exact gradients with constant memory through an exactly invertible sampler (EDICT,
arXiv 2211.12446, as used for gradients by DOODL, arXiv 2303.13703; docs/estimators/index.md).

EDICT couples two copies x, y of the latent (both start at x_N) with DDIM's coefficients
(a_i, b_i) and a mixing weight p:

    x' = a_i x + b_i eps(y, t_i)        y' = a_i y + b_i eps(x', t_i)
    x_{i-1} = p x' + (1 - p) y'         y_{i-1} = p y' + (1 - p) x_{i-1}

and every step inverts in closed form:

    y' = (y_{i-1} - (1 - p) x_{i-1}) / p     x' = (x_{i-1} - (1 - p) y') / p
    y_i = (y' - b_i eps(x', t_i)) / a_i      x_i = (x' - b_i eps(y_i, t_i)) / a_i.

The output is x_0. DOODL's backward walks the chain from x_0 back to x_N, recomputing each
step's input from its output by the inverse, then that step's forward with its graph, and pulls
the adjoint through it: the exact gradient of the EDICT chain (up to the inversion's rounding)
with memory of one step, A + O(S), for 2N forwards to sample and 4N more in backward, 2N VJPs.
`reconstruct=false` keeps the whole graph instead (plain backprop through EDICT: the reference).

It changes the sampler: this is not DDIM, so rows say sampler = edict, agreement is measured
against the exact gradient of the EDICT chain, and the reward is that of EDICT's own samples.
Deterministic sampler only (eta = 0)."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from bench.errors import Diverged
from bench.options import Option
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, require_graph, write_gradients


def _mixing(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


RECONSTRUCTION_TOLERANCE = 1e-3  # relative error of the recovered x_N beyond which the gradient is garbage


def _check_reconstruction(problem: Problem, x: Tensor, y: Tensor) -> None:
    """The inverse must lead back to the latent (x_N = y_N = x_start). Its rounding errors grow
    about like p^-2 per step: measured on the toy in float64 (p = 0.93), the gradient's relative
    error to the stored-graph one is 3e-16 at N = 50, 5e-10 at 200, 5e-4 at 300, 0.16 at 500 and
    NaN at 1000. Past the tolerance the cell is `diverged`, never a silent wrong gradient."""
    scale = float(problem.x_start.detach().norm()) or 1.0
    drift = max(float((x - problem.x_start.detach()).norm()), float((y - problem.x_start.detach()).norm())) / scale
    if not drift <= RECONSTRUCTION_TOLERANCE:  # NaN included
        raise Diverged(
            f"EDICT's inverse lost the forward trajectory: the recovered x_N is off by {drift:.1e} "
            f"(relative) after {problem.num_steps} steps; its error grows like p^-2 per step "
            f"(use fewer steps, p nearer 1, or reconstruct=false)"
        )


class EDICT(Estimator):
    name = "edict"
    plot_style = ("#bcbd22", "p")  # colour and marker in every figure
    summary = "exact gradient, constant memory, through EDICT's invertible coupled sampler (DOODL)"
    sampler = "edict"
    exact = True
    options = (
        Option("p", float, 0.93, "mixing weight of the coupled updates (the paper's 0.93)", check=_mixing),
        Option("reconstruct", bool, True, "recompute states by the inverse (false: keep the whole graph)"),
    )
    variants = ("reconstruct=false", "p=0.8")

    def reference_spec(self) -> str:
        return f"edict[p={self.p},reconstruct=false]"

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.chain.schedule.eta > 0:
            return "EDICT inverts the deterministic sampler only (eta = 0)"
        if not hasattr(problem.chain.schedule, "coefficients"):
            return (
                f"EDICT couples single-step samplers x' = a x + b out (ddim, flow-euler); "
                f"{problem.chain.schedule.sampler} is a multistep solver"
            )
        if problem.target == "noise":
            return "the deterministic EDICT chain injects no noise; use target latent"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        if not self.reconstruct:
            return Cost(nfe_forward=2 * steps, nfe_vjp=2 * steps, memory="2N·A", activations=2 * steps)
        return Cost(
            nfe_forward=6 * steps,
            nfe_vjp=2 * steps,
            memory="2A + 4S",
            activations=2,
            latents=4,
            activations_at_reward=0,
        )

    def step(self, problem: Problem, i: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        a, b, _ = problem.chain.schedule.coefficients(i)
        eps = lambda z: problem.chain.eps(z, i, problem.cond)  # noqa: E731
        x_mid = a * x + b * eps(y)
        y_mid = a * y + b * eps(x_mid)
        x_next = self.p * x_mid + (1 - self.p) * y_mid
        return x_next, self.p * y_mid + (1 - self.p) * x_next

    def invert(self, problem: Problem, i: int, x_next: Tensor, y_next: Tensor) -> tuple[Tensor, Tensor]:
        a, b, _ = problem.chain.schedule.coefficients(i)
        eps = lambda z: problem.chain.eps(z, i, problem.cond)  # noqa: E731
        y_mid = (y_next - (1 - self.p) * x_next) / self.p
        x_mid = (x_next - (1 - self.p) * y_mid) / self.p
        y = (y_mid - b * eps(x_mid)) / a
        return (x_mid - b * eps(y)) / a, y

    def run(self, problem: Problem, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x
        for i in range(problem.num_steps, 0, -1):
            x, y = self.step(problem, i, x, y)
        return x, y

    @torch.no_grad()
    def sample(self, problem: Problem) -> Tensor:
        return self.run(problem, problem.x_start.detach())[0]

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        if not self.reconstruct:
            x0, _ = self.run(problem, problem.x_start)
            loss, rewards = problem.loss(x0)
            require_graph(loss)
            loss.backward()
            return Estimate(loss=float(loss.detach()), rewards=rewards.detach(), x0=x0.detach())

        with torch.no_grad():
            x, y = self.run(problem, problem.x_start.detach())
        x0 = x.detach().requires_grad_(True)
        loss, rewards = problem.loss(x0)
        require_graph(loss)
        (grad_x,) = torch.autograd.grad(loss, x0)
        grad_y = torch.zeros_like(grad_x)
        params = [leaf for leaf in problem.leaves if leaf is not problem.x_start]
        accumulated = [torch.zeros_like(p) for p in params]
        for i in range(1, problem.num_steps + 1):
            with torch.no_grad():
                x, y = self.invert(problem, i, x, y)  # the step's input, from its output
            x_in, y_in = x.detach().requires_grad_(True), y.detach().requires_grad_(True)
            with torch.enable_grad():
                x_out, y_out = self.step(problem, i, x_in, y_in)
                grads = torch.autograd.grad(
                    (x_out, y_out), (x_in, y_in, *params), grad_outputs=(grad_x, grad_y), allow_unused=True
                )
            grad_x, grad_y = grads[0], grads[1]
            for total, grad in zip(accumulated, grads[2:]):
                if grad is not None:
                    total.add_(grad)
        _check_reconstruction(problem, x, y)
        write_gradients(problem, grad_x + grad_y, accumulated)  # x_N = y_N: both copies start from the latent
        return Estimate(loss=float(loss.detach()), rewards=rewards.detach(), x0=x0.detach())
