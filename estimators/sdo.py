"""sdo: the one-step shortcut (SDO, arXiv 2505.07477; docs/estimators/index.md).

Sample without graph except at one step k, and keep the sampler's affine arithmetic of every
step as an identity path. With W_x = dx_0/dx_N and W_k = dx_0/d out_k, every model output held
fixed (Schedule.state_weight, output_weight: the step rule's own; for DDIM at eta = 0, where each
step lands on the next grid point (leading spacing, or trailing with N dividing T), W_x =
alpha_0 / alpha_N and W_k = alpha_0 (rho_{k-1} - rho_k)):

    dx_0/dx_N   ~ W_x I + W_k J_x(out_k)   (J term only if k = N)
    dx_0/dtheta ~ W_k d out_k / d theta

computed as x_0 = x_0^ng + W_x (x_N - sg(x_N)) + W_k (out_k - sg(out_k)), where sg stops the
gradient; no rescaling, as in the reference code. On DPM-Solver++ 2M, W_k also counts out_k's
second appearance through the next step's history; on flow-matching Euler W_x = 1,
W_k = sigma_{k-1} - sigma_k. `step` picks k: first (the
call that consumes x_N; the reference code's choice for latent optimisation), last, random
(uniform on every call; the paper's choice for weight tuning), or a 0-based index in sampling
order (0 = first). `last` and `random` choose among the calls whose output enters the chain: on a
schedule that ends on an identity step (leading spacing, steps_offset = 0) the final call has
weight 0, and keeping it would give cond and weights a silent zero. Memory A, time about NF + V (NF alone for x_N when k != N: no VJP is needed).
"""

from __future__ import annotations

import random

import torch

from bench.chain import noise_for
from bench.errors import SpecError
from bench.options import Option
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, step_choice, backprop


class SDO(Estimator):
    name = "sdo"
    plot_style = ("#ff7f0e", "^")  # colour and marker in every figure
    summary = "one-step shortcut: identity path plus one kept denoiser call (SDO)"
    options = (
        Option(
            "step",
            str,
            "first",
            "which call keeps its graph (index: 0-based, sampling order)",
            check=step_choice("first", "last", "random"),
            metavar="first|last|random|<index>",
        ),
    )
    variants = ("step=last", "step=random", "step=1")

    @property
    def random_counts(self) -> bool:
        return self.step == "random"

    def check_steps(self, steps: int) -> None:
        if self.step.isdigit() and int(self.step) >= steps:
            raise SpecError(
                f"{self.spec}: step index {self.step} is outside the chain; valid: 0..{steps - 1}, first, last, random"
            )

    def kept_grid_index(self, steps: int, rng: random.Random | None, effective: tuple[int, ...] | None = None) -> int:
        """Grid index i (N = first call, 1 = last) of the call that keeps its graph; `effective`
        (Schedule.effective_steps) restricts last and random to calls that matter."""
        effective = effective or tuple(range(steps, 0, -1))
        if self.step == "first":
            return steps
        if self.step == "last":
            return effective[-1]
        if self.step == "random":
            return effective[rng.randrange(len(effective))]
        return steps - int(self.step)

    def skip_reason(self, problem: Problem) -> str | None:
        schedule = problem.chain.schedule
        if problem.target in ("cond", "weights") and self.step not in ("last", "random"):
            k = self.kept_grid_index(schedule.num_steps, None)
            if schedule.is_identity(k):
                return (
                    f"the kept call (step={self.step}) is an identity step of this schedule "
                    "(its output has weight 0), so cond and weights would get a zero gradient; "
                    "choose another step, e.g. step=last"
                )
        return None

    def cost(self, steps: int, target: str) -> Cost:
        vjp = 1.0
        if target == "latent":
            # x_N reaches eps_k only when k = N; otherwise the latent's gradient is the identity
            # path alone and no VJP is taken (with step=random, that happens with prob. 1 - 1/N)
            vjp = 1.0 / steps if self.step == "random" else float(self.kept_grid_index(steps, None) == steps)
        # the calls after the kept one run without a graph while its graph is alive (none after
        # the last call)
        later = 1.0 if self.step == "random" or self.kept_grid_index(steps, None) > 1 else 0.0
        return Cost(nfe_forward=steps, nfe_vjp=vjp, memory="A", activations=1, working=later)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        steps = schedule.num_steps
        k = self.kept_grid_index(steps, rng, schedule.effective_steps())
        x_start = problem.x_start
        state = schedule.start(x_start.detach())
        for i in range(steps, 0, -1):
            if i == k:
                kept_out = chain.eps(x_start if i == steps else state[0], i, cond)
                out = kept_out.detach()
            else:
                with torch.no_grad():
                    out = chain.eps(state[0], i, cond)
            state = schedule.advance(state, i, out, noise_for(problem.noises, i))
        identity_path = schedule.state_weight * (x_start - x_start.detach())
        kept_path = schedule.output_weight(k) * (kept_out - kept_out.detach())
        return backprop(problem, state[0] + identity_path + kept_path)
