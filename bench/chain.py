"""The sampling chain every estimator differentiates through: x_N -> x_0, one sampler step per grid
point, and the denoiser calls it makes, counted.

Grid convention: index i runs from N (noisiest) down to 0 (clean end). The denoiser is called at
grid points i = N..1 with model time t_i; step i maps the state at i to the state at i - 1.

The sampler contract (a `Schedule`, built by a sampler in bench/samplers/ for one N):

- A state is a tuple (x_i, *history): the latent and what a multistep solver keeps of earlier
  model outputs (DPM-Solver++ 2M keeps one data prediction; DDIM and flow-matching Euler none).
- `advance(state, i, out, noise)` is a pure function of its arguments: checkpointing and the
  adjoint recompute any step from (state_i, i) alone; nothing hides in scheduler state.
- Every step is affine in (x_i, the model output, the history): x_0 = W_x x_N + sum_i W_i out_i
  (+ injected noise). `state_weight` and `output_weight(i)` are those weights, the linear structure
  that SDO's identity path and AlignProp's latent path follow.
- The probability-flow ODE the sampler discretises, in variables where its first-order step is an
  Euler step: y = x / scale(s), dy/ds = out(scale(s) y, t(s), c), with s = rho = sigma / alpha
  (variance-preserving, epsilon models: DDIM = Euler, DPM-Solver++ a second-order multistep) or
  s = sigma (rectified flow, velocity models: flow-matching Euler). The adjoint integrates it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]
# Schedule.ode_grid_between: a grid uniform in model time is kept if its smallest interval is at
# least this fraction of the uniform grid's, else the grid is uniform in s.
SPREAD = 1e-3


class Schedule:
    """An N-step grid and its step rule: the base of every sampler's schedule (see the module)."""

    sampler: str = ""  # the sampler's spec, recorded in every row
    prediction: ClassVar[str] = "epsilon"  # what the model outputs: epsilon or flow (velocity)
    history_size: ClassVar[int] = 0  # earlier model outputs a step uses
    eta: float = 0.0

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, eta: float = 0.0) -> "Schedule":
        """The schedule of a diffusers scheduler (DDIM, DPM-Solver++ multistep, flow-matching Euler)
        at `num_steps` steps, read from the scheduler's own grid."""
        from bench.samplers import schedule_from_scheduler

        return schedule_from_scheduler(scheduler, num_steps, eta)

    # --- the grid -------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        raise NotImplementedError

    def alpha(self, i: int) -> float:
        """Signal scale at grid point i: x_i = alpha_i x_0 + sigma_i noise."""
        raise NotImplementedError

    def sigma(self, i: int) -> float:
        raise NotImplementedError

    def rho(self, i: int) -> float:
        return self.sigma(i) / self.alpha(i)

    def model_time(self, i: int) -> float:
        """Model time at grid point i (i >= 1 are the sampler's own timesteps)."""
        raise NotImplementedError

    # --- the step -------------------------------------------------------------------------------
    def advance(self, state: State, i: int, out: Tensor, noise: Tensor | None = None) -> State:
        """The state at i - 1 from the state at i and the model output at (x_i, t_i)."""
        raise NotImplementedError

    def noise_std(self, i: int) -> float:
        """Standard deviation of the noise step i injects (0: deterministic)."""
        return 0.0

    def is_identity(self, i: int) -> bool:
        """Step i lands on its own noise level: the state passes unchanged, the output has weight 0."""
        return False

    def start(self, x: Tensor) -> State:
        return (x,)

    def clean_estimate(self, x: Tensor, i: int, out: Tensor) -> Tensor:
        """The model's estimate of x_0 from x_i and its output there (the posterior mean, for a
        well-trained model): (x_i - sigma_i eps) / alpha_i for an epsilon model; x_i - sigma_i v
        for a rectified-flow velocity (x_i = (1 - sigma_i) x_0 + sigma_i noise, v = noise - x_0)."""
        if self.prediction == "flow":
            return x - self.sigma(i) * out
        return (x - self.sigma(i) * out) / self.alpha(i)

    # --- the linear structure -------------------------------------------------------------------
    @functools.cached_property
    def _linear_map(self) -> tuple[float, ...]:
        """x_0's coefficients on (x_N, out_N, ..., out_1), from the step rule run on coefficient
        vectors (exact: every step is affine)."""
        n = self.num_steps
        basis = torch.eye(n + 1, dtype=torch.float64)
        state = self.start(basis[0])
        for i in range(n, 0, -1):
            state = self.advance(state, i, basis[n - i + 1], torch.zeros(n + 1, dtype=torch.float64))
        return tuple(float(v) for v in state[0])

    @property
    def state_weight(self) -> float:
        """dx_0/dx_N with every model output held fixed."""
        return self._linear_map[0]

    def output_weight(self, i: int) -> float:
        """dx_0/d out_i with the state and the other outputs held fixed."""
        return self._linear_map[self.num_steps - i + 1]

    def effective_steps(self) -> tuple[int, ...]:
        """Grid indices N..1 (sampling order) of the steps whose model output enters x_0: the
        steps an estimator that keeps only some calls can usefully keep."""
        return tuple(i for i in range(self.num_steps, 0, -1) if self.output_weight(i) != 0.0)

    # --- the probability-flow ODE ---------------------------------------------------------------
    def ode_point(self, i: int) -> float:
        """The ODE variable s at grid point i (increasing in i)."""
        raise NotImplementedError

    def ode_scale(self, s: float) -> float:
        """x = scale(s) y."""
        raise NotImplementedError

    def ode_time(self, s: float) -> float:
        """Model time at s, off the grid too."""
        raise NotImplementedError

    def ode_point_at_time(self, t: float) -> float:
        raise NotImplementedError

    def ode_grid(self, steps: int) -> list[float]:
        """s at `steps` + 1 points from s_0 up to s_N: the sampler's own (steps = 0 or N), else
        uniform in lambda = log(alpha / sigma) between the same end points (the exponential
        integrators' grid, smooth for every solver), with a fixed first (last) interval where
        lambda is infinite or the model's time stops at an end (`ode_edges`), and uniform in model
        time where lambda is infinite with no edge to stop at (uniform in s where the model time
        hardly moves across the interval, e.g. all of it below rho(t = 0): see `ode_grid_between`).
        Always `steps` + 1 points, strictly increasing where s_0 < s_N."""
        n = self.num_steps
        if steps in (0, n):
            return [self.ode_point(i) for i in range(n + 1)]
        low, high = self.ode_point(0), self.ode_point(n)
        edge_low, edge_high = self.ode_edges()
        # An edge within rounding of an end point is that end point: the same rho computed by two
        # formulas (a grid point's abar, the table at t = 0) can differ by an ulp, and an interval
        # of 1e-18 would waste one of the M evaluations.
        apart = 1e-9 * (high - low)
        head = [low] if low + apart < edge_low < high - apart and steps >= 2 else []
        tail = [high] if low + apart < edge_high < high - apart and steps - len(head) >= 2 else []
        inner = self.ode_grid_between(
            edge_low if head else low, edge_high if tail else high, steps - len(head) - len(tail)
        )
        return head + inner + tail

    def ode_edges(self) -> tuple[float, float]:
        """Where a finer grid puts fixed end intervals: below the first, lambda is infinite or the
        model's time is clamped (a kink); above the second, lambda is infinite. (-inf, inf): none."""
        return -math.inf, math.inf

    def ode_grid_between(self, low: float, high: float, steps: int) -> list[float]:
        """`steps` + 1 points from low to high: uniform in lambda where it is finite at both ends,
        else uniform in model time, else (where model-time steps would leave an interval below
        SPREAD of the uniform one: the model time is clamped across most of the interval, as
        from rho = 0 to rho(t = 0) on a one-step grid ending at abar = 1) uniform in s."""
        if 0 < self.ode_to_rho(low) < math.inf and 0 < self.ode_to_rho(high) < math.inf:
            log_low, log_high = math.log(self.ode_to_rho(low)), math.log(self.ode_to_rho(high))
            inner = [self.ode_from_rho(math.exp(log_low + (log_high - log_low) * j / steps)) for j in range(1, steps)]
        else:
            t_low, t_high = self.ode_time(low), self.ode_time(high)
            inner = [self.ode_point_at_time(t_low + (t_high - t_low) * j / steps) for j in range(1, steps)]
            grid = [low, *inner, high]
            if min(b - a for a, b in zip(grid, grid[1:])) <= SPREAD * (high - low) / steps:
                inner = [low + (high - low) * j / steps for j in range(1, steps)]
        return [low, *inner, high]

    def ode_to_rho(self, s: float) -> float:
        """rho = sigma / alpha at ODE point s (lambda = -log rho)."""
        return s

    def ode_from_rho(self, rho: float) -> float:
        return rho

    def ode_lambda_midpoint(self, a: float, b: float) -> float:
        """The point between s = a and s = b halfway in lambda = -log rho (DPM-Solver-2's
        intermediate point), or halfway in s where lambda is infinite at an end."""
        rho_a, rho_b = self.ode_to_rho(a), self.ode_to_rho(b)
        if not (0 < rho_a < math.inf and 0 < rho_b < math.inf):
            return (a + b) / 2
        return self.ode_from_rho(math.sqrt(rho_a * rho_b))


class AffineStep:
    """The step of a one-step sampler given by its coefficients (a_i, b_i, s_i) = `coefficients(i)`,
    which the schedule defines: x_{i-1} = a_i x_i + b_i out_i + s_i xi_i (DDIM, flow-sde)."""

    def step(self, x: Tensor, i: int, out: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_{i-1} from x_i and the denoiser output at (x_i, t_i). Pure tensor arithmetic."""
        a, b, s = self.coefficients(i)
        x_next = a * x + b * out
        if s > 0:
            if noise is None:
                raise ValueError(f"step {i} has eta > 0 and needs its injected noise")
            x_next = x_next + s * noise
        return x_next

    def advance(self, state: State, i: int, out: Tensor, noise: Tensor | None = None) -> State:
        return (self.step(state[0], i, out, noise),)


@dataclass(frozen=True)
class VPSchedule(Schedule):
    """A variance-preserving grid from a training table abar(t) (DDPM betas): alpha_i = sqrt(abar_i).
    The ODE variable is rho = sigma / alpha, with scale(rho) = 1 / sqrt(1 + rho^2)."""

    timesteps: tuple[float, ...]  # model time t_i for i = 1..N, stored as timesteps[i - 1]
    alpha_bar: tuple[float, ...]  # abar_i for i = 0..N
    train_alpha_bar: tuple[float, ...]  # the training table abar(t), t = 0..T-1

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, i: int) -> float:
        return math.sqrt(self.alpha_bar[i])

    def sigma(self, i: int) -> float:
        return math.sqrt(1.0 - self.alpha_bar[i])

    def model_time(self, i: int) -> float:
        if i >= 1:
            return float(self.timesteps[i - 1])
        return self.time_at_rho(self.rho(0))

    def time_at_rho(self, rho: float) -> float:
        """Model time t with rho(t) = rho, where abar(t) interpolates log abar linearly in t (as
        `alpha_bar_at_time`), clamped to [0, T-1]: the model is never asked outside its range."""
        table = _log_alpha_bar(self.train_alpha_bar)
        target = -math.log1p(rho * rho)
        if target >= table[0]:
            return 0.0
        if target <= table[-1]:
            return float(len(table) - 1)
        lo, hi = 0, len(table) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if table[mid] >= target:
                lo = mid
            else:
                hi = mid
        return lo + (table[lo] - target) / (table[lo] - table[hi])

    def rho_at_time(self, t: float) -> float:
        table = _log_alpha_bar(self.train_alpha_bar)
        t = min(max(t, 0.0), len(table) - 1.0)
        lo = min(int(math.floor(t)), len(table) - 2)
        log_abar = table[lo] + (t - lo) * (table[lo + 1] - table[lo])
        return math.sqrt(max(math.expm1(-log_abar), 0.0))

    def ode_point(self, i: int) -> float:
        return self.rho(i)

    def ode_scale(self, s: float) -> float:
        return 1.0 / math.sqrt(1.0 + s * s)

    def ode_time(self, s: float) -> float:
        return self.time_at_rho(s)

    def ode_point_at_time(self, t: float) -> float:
        return self.rho_at_time(t)

    def ode_edges(self) -> tuple[float, float]:
        return self.rho_at_time(0.0), math.inf  # below rho(t = 0) the model time is clamped


@functools.lru_cache(maxsize=8)
def _log_alpha_bar(train_alpha_bar: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(math.log(ab) for ab in train_alpha_bar)


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
    """A denoiser out(x, t, cond) (epsilon or velocity, as the schedule's sampler expects) and a
    schedule, with every denoiser call counted.

    A VJP is counted when a gradient reaches a denoiser output during backward (a tensor hook),
    so recomputation by checkpointing counts as a forward but not as an extra VJP."""

    denoiser: nn.Module
    schedule: Schedule
    counter: CallCounter = field(default_factory=CallCounter)

    def _count_vjp(self, grad: Tensor) -> None:
        self.counter.vjp += 1

    def denoise_at(self, x: Tensor, t: float | Tensor, cond: Tensor | None) -> Tensor:
        """The denoiser at model time t: one number for the batch, or a (B,) tensor, one per sample."""
        self.counter.forward += 1
        t_tensor = (
            t.to(device=x.device)
            if isinstance(t, Tensor)
            else torch.full(
                (x.shape[0],), t, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device
            )
        )
        out = self.denoiser(x, t_tensor, cond)
        if out.requires_grad:
            out.register_hook(self._count_vjp)
        return out

    def eps(self, x: Tensor, i: int, cond: Tensor | None) -> Tensor:
        """The model output at grid point i (i = N..1): epsilon, or the velocity of a flow model."""
        return self.denoise_at(x, self.schedule.model_time(i), cond)

    def advance(self, state: State, i: int, cond: Tensor | None, noises: list[Tensor] | None = None) -> State:
        """One sampler step with the model called on the state's latent."""
        return self.schedule.advance(state, i, self.eps(state[0], i, cond), noise_for(noises, i))

    @torch.no_grad()
    def sample(
        self, x_start: Tensor, cond: Tensor | None, noises: list[Tensor] | None = None, keep_states: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Run the sampler without graph; optionally return every latent x_N..x_0 (x_i at [N - i];
        a multistep solver's history is not kept)."""
        state, states = self.schedule.start(x_start.detach()), []
        for i in range(self.schedule.num_steps, 0, -1):
            if keep_states:
                states.append(state[0])
            state = self.advance(state, i, cond, noises)
        if keep_states:
            states.append(state[0])
            return state[0], states
        return state[0]


def noise_for(noises: list[Tensor] | None, i: int) -> Tensor | None:
    """The injected noise xi_i of step i (stored at noises[i - 1])."""
    return None if noises is None else noises[i - 1]
