"""DDIM (eta >= 0), diffusers' DDIMScheduler:

    x_{i-1} = a_i x_i + b_i eps_i + s_i xi_i                                  (DDIM, eq. 12)
    a_i = alpha_{i-1} / alpha_i
    b_i = sqrt(1 - abar_{i-1} - s_i^2) - alpha_{i-1} sigma_i / alpha_i
    s_i = eta * sqrt((1 - abar_{i-1}) / (1 - abar_i) * (1 - abar_i / abar_{i-1}))

In y = x / alpha, rho = sigma / alpha this is y_{i-1} = y_i + beta_i eps_i + (s_i/alpha_{i-1}) xi_i
with beta_i = b_i / alpha_{i-1} (= rho_{i-1} - rho_i when eta = 0): one Euler step of the
probability-flow ODE dy/drho = eps(alpha(rho) y, t(rho), c).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from bench.chain import State, VPSchedule
from bench.errors import SpecError
from bench.samplers import Sampler, check_steps_argument


@dataclass(frozen=True)
class DDIMSchedule(VPSchedule):
    alpha_bar_prev: tuple[float, ...] = ()  # where step i lands, at [i - 1]: equals abar_{i-1} on
    #                                         consistent grids (not trailing spacing with N not dividing T)
    eta: float = 0.0
    sampler: str = "ddim"

    @classmethod
    def read(cls, scheduler, num_steps: int, eta: float = 0.0) -> "DDIMSchedule":
        """Read the grid from a diffusers DDIMScheduler (or any scheduler with the same config)."""
        if eta < 0:
            raise SpecError(f"eta must be >= 0, got {eta}")
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise SpecError(f"prediction_type={prediction!r} is not supported by ddim; valid: epsilon")
        train = scheduler.config.num_train_timesteps
        check_steps_argument(num_steps, train)
        scheduler.set_timesteps(num_steps)
        table = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        ts = [int(t) for t in scheduler.timesteps]  # descending: t_N, ..., t_1
        ratio = train // num_steps
        # DDIMScheduler.step goes from abar[t] to abar[t - T // N] (the final value below 0); with
        # the usual spacings that is the next grid timestep, and the grid is one ODE's Euler grid.
        abar = [float(table[t]) for t in reversed(ts)]  # abar_i for i = 1..N
        prev = [float(table[t - ratio]) if t - ratio >= 0 else final for t in reversed(ts)]
        return cls(timesteps=tuple(float(t) for t in reversed(ts)), alpha_bar=(prev[0], *abar),
                   train_alpha_bar=tuple(float(v) for v in table), alpha_bar_prev=tuple(prev),
                   eta=float(eta))

    def noise_std(self, i: int) -> float:
        ab, ab_prev = self.alpha_bar[i], self.alpha_bar_prev[i - 1]
        variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        return self.eta * math.sqrt(max(variance, 0.0))

    def coefficients(self, i: int) -> tuple[float, float, float]:
        """(a_i, b_i, s_i) of step i: x_{i-1} = a_i x_i + b_i eps + s_i xi."""
        if self.is_identity(i):
            return 1.0, 0.0, 0.0  # exactly (the formula leaves b at rounding level, not 0)
        s = self.noise_std(i)
        ab, ab_prev = self.alpha_bar[i], self.alpha_bar_prev[i - 1]
        a = math.sqrt(ab_prev / ab)
        b = math.sqrt(max(1 - ab_prev - s * s, 0.0)) - math.sqrt(ab_prev) * math.sqrt(1 - ab) / math.sqrt(ab)
        return a, b, s

    def is_identity(self, i: int) -> bool:
        """Step i lands on its own noise level (abar_{i-1} = abar_i): x_{i-1} = x_i, the denoiser
        output has weight 0 and no noise is injected. diffusers' DDIMScheduler defaults (leading
        spacing, steps_offset = 0, set_alpha_to_one = False) end on such a step, and so does
        trailing spacing at N = T: two grid points share one rho."""
        return self.alpha_bar_prev[i - 1] == self.alpha_bar[i]

    def eps_weight(self, i: int) -> float:
        """beta_i = b_i / alpha_{i-1}: weight of eps_i in y_0 = y_N + sum_i beta_i eps_i + noise."""
        return self.coefficients(i)[1] / math.sqrt(self.alpha_bar_prev[i - 1])

    # SDO's weights in the ODE view y_0 = y_N + sum_i beta_i eps_i (ESTIMATORS.md, section 4):
    # W_x = alpha_0 / alpha_N, W_i = alpha_0 beta_i. They equal the step rule's own product of a_i
    # wherever each step lands on the next grid point; on a trailing grid with N not dividing T
    # (steps land beside the next point) the literal product differs by about 1 %.
    @property
    def state_weight(self) -> float:
        return self.alpha(0) / self.alpha(self.num_steps)

    def output_weight(self, i: int) -> float:
        return self.alpha(0) * self.eps_weight(i)

    def step(self, x: Tensor, i: int, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_{i-1} from x_i and the denoiser output at (x_i, t_i). Pure tensor arithmetic."""
        a, b, s = self.coefficients(i)
        out = a * x + b * eps
        if s > 0:
            if noise is None:
                raise ValueError(f"step {i} has eta > 0 and needs its injected noise")
            out = out + s * noise
        return out

    def advance(self, state: State, i: int, out: Tensor, noise: Tensor | None = None) -> State:
        return (self.step(state[0], i, out, noise),)


class DDIM(Sampler):
    name = "ddim"
    summary = "DDIM (eta >= 0 from the task's eta option): diffusers' DDIMScheduler"
    prediction = "epsilon"
    stochastic = True
    scheduler_class = "DDIMScheduler"

    def schedule_from(self, scheduler, steps: int, eta: float) -> DDIMSchedule:
        return DDIMSchedule.read(scheduler, steps, eta)
