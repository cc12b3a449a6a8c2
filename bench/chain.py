"""The sampling chain every estimator differentiates through: x_N -> x_0 with DDIM (eta >= 0).

Grid convention: index i runs from N (noisiest) down to 0 (clean end). The denoiser is called at
grid points i = N..1 with model time t_i; step i maps x_i to x_{i-1}:

    x_{i-1} = a_i x_i + b_i eps_i + s_i xi_i                                  (DDIM, eq. 12)
    a_i = alpha_{i-1} / alpha_i
    b_i = sqrt(1 - abar_{i-1} - s_i^2) - alpha_{i-1} sigma_i / alpha_i
    s_i = eta * sqrt((1 - abar_{i-1}) / (1 - abar_i) * (1 - abar_i / abar_{i-1}))

In y = x / alpha, rho = sigma / alpha this is y_{i-1} = y_i + beta_i eps_i + (s_i/alpha_{i-1}) xi_i
with beta_i = b_i / alpha_{i-1} (= rho_{i-1} - rho_i when eta = 0): one Euler step of the
probability-flow ODE dy/drho = eps(alpha(rho) y, t(rho), c).

The step is pure: nothing depends on hidden scheduler state, so checkpointing and the adjoint can
recompute any step from (x_i, i) alone.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bench.errors import SpecError


@dataclass(frozen=True)
class Schedule:
    """Noise levels of an N-step DDIM grid, in float64 Python floats (exact, device-free)."""

    timesteps: tuple[int, ...]  # model time t_i for i = 1..N, stored as timesteps[i - 1]
    alpha_bar: tuple[float, ...]  # abar_i for i = 0..N
    alpha_bar_prev: tuple[float, ...]  # where step i lands, at [i - 1]: equals abar_{i-1} on
    #                                     consistent grids (e.g. not trailing spacing with N not dividing T)
    eta: float
    train_alpha_bar: tuple[float, ...]  # the training table abar(t), t = 0..T-1

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, eta: float = 0.0) -> "Schedule":
        """Read the grid from a diffusers DDIMScheduler (or any scheduler with the same config)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise SpecError(f"step count must be a positive integer, got {num_steps!r}")
        if eta < 0:
            raise SpecError(f"eta must be >= 0, got {eta}")
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise SpecError(f"prediction_type={prediction!r} is not supported; valid: epsilon")
        train = scheduler.config.num_train_timesteps
        if num_steps > train:
            raise SpecError(f"step count {num_steps} exceeds the {train} training timesteps")
        scheduler.set_timesteps(num_steps)
        table = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        ts = [int(t) for t in scheduler.timesteps]  # descending: t_N, ..., t_1
        ratio = train // num_steps
        # DDIMScheduler.step goes from abar[t] to abar[t - T // N] (the final value below 0); with
        # the usual spacings that is the next grid timestep, and the grid is one ODE's Euler grid.
        abar = [float(table[t]) for t in reversed(ts)]  # abar_i for i = 1..N
        prev = [float(table[t - ratio]) if t - ratio >= 0 else final for t in reversed(ts)]
        return cls(timesteps=tuple(reversed(ts)), alpha_bar=(prev[0], *abar),
                   alpha_bar_prev=tuple(prev), eta=float(eta),
                   train_alpha_bar=tuple(float(v) for v in table))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, i: int) -> float:
        return math.sqrt(self.alpha_bar[i])

    def sigma(self, i: int) -> float:
        return math.sqrt(1.0 - self.alpha_bar[i])

    def rho(self, i: int) -> float:
        return self.sigma(i) / self.alpha(i)

    def model_time(self, i: int) -> float:
        """Model time at grid point i (i >= 1 are the sampler's own timesteps)."""
        if i >= 1:
            return float(self.timesteps[i - 1])
        return self.time_at_rho(self.rho(0))

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

    def effective_steps(self) -> tuple[int, ...]:
        """Grid indices N..1 (sampling order) of the steps whose denoiser output enters the chain
        (b_i != 0): the steps an estimator that keeps only some calls can usefully keep."""
        return tuple(i for i in range(self.num_steps, 0, -1) if self.coefficients(i)[1] != 0.0)

    def eps_weight(self, i: int) -> float:
        """beta_i = b_i / alpha_{i-1}: weight of eps_i in y_0 = y_N + sum_i beta_i eps_i + noise."""
        return self.coefficients(i)[1] / math.sqrt(self.alpha_bar_prev[i - 1])

    def step(self, x: Tensor, i: int, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_{i-1} from x_i and the denoiser output at (x_i, t_i). Pure tensor arithmetic."""
        a, b, s = self.coefficients(i)
        out = a * x + b * eps
        if s > 0:
            if noise is None:
                raise ValueError(f"step {i} has eta > 0 and needs its injected noise")
            out = out + s * noise
        return out

    # Continuous time, for the adjoint ODE on grids finer than the sampler's.
    def time_at_rho(self, rho: float) -> float:
        """Model time t with rho(t) = rho, by linear interpolation of the training table in t
        (clamped to [0, T-1]: the model is never asked outside its training range)."""
        rhos = _rho_table(self.train_alpha_bar)
        if rho <= rhos[0]:
            return 0.0
        if rho >= rhos[-1]:
            return float(len(rhos) - 1)
        lo, hi = 0, len(rhos) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if rhos[mid] <= rho:
                lo = mid
            else:
                hi = mid
        return lo + (rho - rhos[lo]) / (rhos[hi] - rhos[lo])


@functools.lru_cache(maxsize=8)
def _rho_table(train_alpha_bar: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(math.sqrt(1 - ab) / math.sqrt(ab) for ab in train_alpha_bar)


def alpha_bar_at_time(t: Tensor, train_alpha_bar: Tensor) -> Tensor:
    """abar(t) for a (possibly fractional) model time, by linear interpolation of log abar."""
    log_table = train_alpha_bar.log()
    t = t.to(log_table.dtype).clamp(0, len(log_table) - 1)
    lo = t.floor().long().clamp(max=len(log_table) - 2)
    frac = t - lo.to(t.dtype)
    return (log_table[lo] * (1 - frac) + log_table[lo + 1] * frac).exp()


@dataclass
class CallCounter:
    """Denoiser forwards and vector-Jacobian products through the denoiser's output."""

    forward: int = 0
    vjp: int = 0

    def reset(self) -> None:
        self.forward = 0
        self.vjp = 0


@dataclass
class Chain:
    """A denoiser eps(x, t, cond) and a schedule, with every denoiser call counted.

    A VJP is counted when a gradient reaches a denoiser output during backward (a tensor hook),
    so recomputation by checkpointing counts as a forward but not as an extra VJP."""

    denoiser: nn.Module
    schedule: Schedule
    counter: CallCounter = field(default_factory=CallCounter)

    def _count_vjp(self, grad: Tensor) -> None:
        self.counter.vjp += 1

    def denoise_at(self, x: Tensor, t: float, cond: Tensor | None) -> Tensor:
        self.counter.forward += 1
        t_tensor = torch.full((x.shape[0],), t, dtype=x.dtype if x.is_floating_point() else torch.float32,
                              device=x.device)
        eps = self.denoiser(x, t_tensor, cond)
        if eps.requires_grad:
            eps.register_hook(self._count_vjp)
        return eps

    def eps(self, x: Tensor, i: int, cond: Tensor | None) -> Tensor:
        """Denoiser output at grid point i (i = N..1)."""
        return self.denoise_at(x, self.schedule.model_time(i), cond)

    @torch.no_grad()
    def sample(self, x_start: Tensor, cond: Tensor | None, noises: list[Tensor] | None = None,
               keep_states: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Run the sampler without graph; optionally return every state x_N..x_0 (x_i at [N - i])."""
        x, states = x_start.detach(), []
        for i in range(self.schedule.num_steps, 0, -1):
            if keep_states:
                states.append(x)
            x = self.schedule.step(x, i, self.eps(x, i, cond), noise_for(noises, i))
        if keep_states:
            states.append(x)
            return x, states
        return x


def noise_for(noises: list[Tensor] | None, i: int) -> Tensor | None:
    """The injected noise xi_i of step i (stored at noises[i - 1])."""
    return None if noises is None else noises[i - 1]
