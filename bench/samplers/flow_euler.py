"""Euler for rectified flow / flow matching (SD3, FLUX), diffusers' FlowMatchEulerDiscreteScheduler:
the model predicts the velocity v = noise - x_0 of x_sigma = (1 - sigma) x_0 + sigma noise, and

    x_{i-1} = x_i + (sigma_{i-1} - sigma_i) v(x_i, t_i, c),   t_i = sigma_i T,

one Euler step of dx/dsigma = v. The grid is the scheduler's: sigmas from 1 (shifted by `shift`,
sigma' = shift sigma / (1 + (shift - 1) sigma)) down to the appended final 0. In DDIM's terms
this is DDIM with alpha = 1 - sigma and eps = x + (1 - sigma) v; here the ODE variable is sigma
itself (rho = sigma / (1 - sigma) is infinite at the start)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from bench.chain import Schedule, State
from bench.errors import SpecError
from bench.options import Option
from bench.samplers import Sampler, check_steps_argument


def _shift(value: float) -> str | None:
    return None if value >= 0 else "must be > 0 (0: the model's own)"


@dataclass(frozen=True)
class FlowEulerSchedule(Schedule):
    timesteps: tuple[float, ...]  # model time t_i for i = 1..N at [i - 1]
    sigmas: tuple[float, ...]  # sigma_i for i = 0..N
    train_timesteps: int
    sampler: str = "flow-euler"
    prediction = "flow"

    @classmethod
    def read(cls, scheduler, num_steps: int) -> "FlowEulerSchedule":
        config = scheduler.config
        problems = [
            f"{key}=True (valid: False)"
            for key in (
                "use_dynamic_shifting",
                "invert_sigmas",
                "stochastic_sampling",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
            )
            if config.get(key)
        ]
        if config.get("shift_terminal"):
            problems.append(f"shift_terminal={config.shift_terminal} (valid: None)")
        if problems:
            raise SpecError("flow-matching Euler scheduler configuration not supported: " + "; ".join(problems))
        check_steps_argument(num_steps, config.num_train_timesteps)
        scheduler.set_timesteps(num_steps)
        return cls.on_grid(scheduler)

    @classmethod
    def on_grid(cls, scheduler) -> "FlowEulerSchedule":
        """The schedule of a scheduler whose grid is already set (`set_timesteps`, with the sigmas
        and the dynamic shift mu a pipeline passes, as FLUX's does)."""
        sigmas = [float(s) for s in scheduler.sigmas]  # sampling order, then the final 0
        ts = [float(t) for t in scheduler.timesteps]
        return cls(
            timesteps=tuple(reversed(ts)),
            sigmas=tuple(reversed(sigmas)),
            train_timesteps=int(scheduler.config.num_train_timesteps),
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, i: int) -> float:
        return 1.0 - self.sigmas[i]

    def sigma(self, i: int) -> float:
        return self.sigmas[i]

    def rho(self, i: int) -> float:
        return math.inf if self.sigmas[i] >= 1 else self.sigmas[i] / (1 - self.sigmas[i])

    def model_time(self, i: int) -> float:
        return float(self.timesteps[i - 1]) if i >= 1 else self.sigmas[0] * self.train_timesteps

    def coefficients(self, i: int) -> tuple[float, float, float]:
        """(a_i, b_i, s_i): x_{i-1} = a_i x_i + b_i v_i (no injected noise)."""
        return 1.0, self.sigmas[i - 1] - self.sigmas[i], 0.0

    def is_identity(self, i: int) -> bool:
        return self.sigmas[i - 1] == self.sigmas[i]

    def advance(self, state: State, i: int, out: Tensor, noise: Tensor | None = None) -> State:
        return (state[0] + (self.sigmas[i - 1] - self.sigmas[i]) * out,)

    # The ODE dx/dsigma = v(x, sigma T): s = sigma, scale 1.
    def ode_point(self, i: int) -> float:
        return self.sigmas[i]

    def ode_scale(self, s: float) -> float:
        return 1.0

    def ode_time(self, s: float) -> float:
        return s * self.train_timesteps

    def ode_point_at_time(self, t: float) -> float:
        return t / self.train_timesteps

    def ode_edges(self) -> tuple[float, float]:
        """lambda is infinite at sigma = 0 and 1: one model time unit from each end."""
        return 1.0 / self.train_timesteps, 1.0 - 1.0 / self.train_timesteps

    def ode_to_rho(self, s: float) -> float:
        return math.inf if s >= 1 else s / (1 - s)

    def ode_from_rho(self, rho: float) -> float:
        return rho / (1 + rho)


class FlowEuler(Sampler):
    name = "flow-euler"
    summary = "Euler on a rectified-flow velocity model: diffusers' FlowMatchEulerDiscreteScheduler"
    prediction = "flow"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    options = (
        Option(
            "shift",
            float,
            0.0,
            "timestep shift (SD3 uses 3.0); 0: the model's own, its scheduler configuration's (1 without one)",
            check=_shift,
        ),
    )

    def scheduler_config(self) -> dict:
        return {"shift": self.shift} if self.shift else {}

    def schedule_from(self, scheduler, steps: int, eta: float) -> FlowEulerSchedule:
        return FlowEulerSchedule.read(scheduler, steps)
