"""The flow ODE turned into a marginal-preserving SDE (Flow-GRPO, Liu et al. 2025, "Flow-GRPO:
Training Flow Matching Models via Online RL", its Eq. 9 discretised by Euler-Maruyama), on the
grid of diffusers' FlowMatchEulerDiscreteScheduler. With x_sigma = (1 - sigma) x_0 + sigma noise
and v = noise - x_0, the reverse SDE with noise level sigma_t = a sqrt(sigma / (1 - sigma)) has
the ODE's marginals; one step from sigma_i to sigma_{i-1} (dt = sigma_{i-1} - sigma_i < 0) is

    x_{i-1} = x_i (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt + s sqrt(-dt) xi,

s = sigma_t at sigma = sigma_i, a the task's `eta` (Flow-GRPO's noise level, 0.7 there). Where
sigma_i = 1 the ratio sigma / (1 - sigma) is read at the next grid point, as Flow-GRPO does. Each
step is Gaussian, so the score-function estimator (Flow-GRPO's policy gradient) has its per-step
log-probabilities; with eta = 0 it is flow-matching Euler. Every step is affine in (x_i, v_i, xi_i):
x_{i-1} = a_i x_i + b_i v_i + s_i xi_i (`coefficients`).

The SDE window (`window`, `start`): MixGRPO and Flow-GRPO-Fast inject noise on a few consecutive
steps only and take the ODE's step elsewhere, so that the policy gradient has fewer steps to score.
With window = w > 0, the steps start, ..., start + w - 1 in sampling order (0: the first step) are
the SDE's and the others flow-matching Euler; window steps past the grid's end are none. MixGRPO
slides its window over the training iterations; here a cell has one window (a sweep over `start`
is the slide)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.chain import AffineStep
from bench.options import Option, at_least
from bench.samplers.flow_euler import FlowEuler, FlowEulerSchedule


@dataclass(frozen=True)
class FlowSDESchedule(AffineStep, FlowEulerSchedule):
    eta: float = 0.0
    window_start: int = 0  # the window's first step in sampling order
    window_size: int = 0  # its length; 0: every step is the SDE's
    sampler: str = "flow-sde"

    def in_window(self, i: int) -> bool:
        """Whether step i (grid index N..1) is one of the SDE's."""
        order = self.num_steps - i
        return self.window_size == 0 or self.window_start <= order < self.window_start + self.window_size

    def noise_scale(self, i: int) -> float:
        """sigma_t of step i: eta sqrt(sigma_i / (1 - sigma_i)), the next grid point's ratio at
        sigma_i = 1; 0 outside the window."""
        if self.eta == 0 or not self.in_window(i):
            return 0.0
        sigma = self.sigmas[i]
        below = self.sigmas[i - 1] if sigma >= 1 else sigma
        return self.eta * math.sqrt(sigma / (1 - below)) if below < 1 else 0.0

    def coefficients(self, i: int) -> tuple[float, float, float]:
        """(a_i, b_i, s_i): x_{i-1} = a_i x_i + b_i v_i + s_i xi_i."""
        sigma, dt = self.sigmas[i], self.sigmas[i - 1] - self.sigmas[i]
        if dt == 0:
            return 1.0, 0.0, 0.0
        scale = self.noise_scale(i)
        if scale == 0 or sigma == 0:
            return 1.0, dt, 0.0
        a = 1 + scale**2 * dt / (2 * sigma)
        b = (1 + scale**2 * (1 - sigma) / (2 * sigma)) * dt
        return a, b, scale * math.sqrt(-dt)

    def noise_std(self, i: int) -> float:
        return self.coefficients(i)[2]

    # step and advance: AffineStep's, on these coefficients


class FlowSDEScheduler:
    """The reference the sampler suite runs against: diffusers' FlowMatchEulerDiscreteScheduler for
    the grid and the deterministic step, and Flow-GRPO's SDE step written in its own form (the mean
    from sigma, dt and the noise level; then the noise) when eta > 0, on the window's steps."""

    def __init__(self, scheduler, window_start: int = 0, window_size: int = 0) -> None:
        object.__setattr__(self, "inner", scheduler)
        object.__setattr__(self, "window", (window_start, window_size))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):  # the suite reads the scheduler's tables in float64
        setattr(self.inner, name, value)

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0, variance_noise=None):
        index = int((self.inner.timesteps == timestep).nonzero()[0])  # sampling order
        start, size = self.window
        ode = self.inner.step(model_output, timestep, sample)  # on every step: it counts its steps
        if eta == 0 or (size and not start <= index < start + size):
            return ode
        sigmas = self.inner.sigmas.to(torch.float64)
        sigma, sigma_prev = float(sigmas[index]), float(sigmas[index + 1])
        sigma_max = float(sigmas[1])  # Flow-GRPO's stand-in for 1 - sigma where sigma = 1
        std = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * eta
        dt = sigma_prev - sigma
        mean = sample * (1 + std**2 / (2 * sigma) * dt) + model_output * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        return _Output(mean + std * math.sqrt(-dt) * variance_noise)


@dataclass
class _Output:
    prev_sample: Tensor


class FlowSDE(FlowEuler):
    name = "flow-sde"
    summary = "Flow-GRPO's marginal-preserving SDE on a rectified-flow model (eta: its noise level)"
    stochastic = True
    options = (
        *FlowEuler.options,
        Option(
            "window",
            int,
            0,
            "SDE steps (MixGRPO, Flow-GRPO-Fast): that many consecutive steps from `start` inject noise, "
            "the others are flow-matching Euler; 0: every step",
            check=at_least(0),
        ),
        Option("start", int, 0, "the SDE window's first step in sampling order (0: the first)", check=at_least(0)),
    )
    variants = ("shift=3", "window=1", "start=1,window=2")

    def scheduler(self, config):
        return FlowSDEScheduler(super().scheduler(config), self.start, self.window)

    def schedule_from(self, scheduler, steps: int, eta: float) -> FlowSDESchedule:
        schedule = FlowSDESchedule.read(scheduler, steps)
        return dataclasses.replace(schedule, eta=float(eta), window_start=self.start, window_size=self.window)
