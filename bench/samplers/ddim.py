"""DDIM (eta >= 0), diffusers' DDIMScheduler:

    x_{i-1} = a_i x_i + b_i eps_i + s_i xi_i                                  (DDIM, eq. 12)
    a_i = alpha_{i-1} / alpha_i
    b_i = sqrt(1 - abar_{i-1} - s_i^2) - alpha_{i-1} sigma_i / alpha_i
    s_i = eta * sqrt((1 - abar_{i-1}) / (1 - abar_i) * (1 - abar_i / abar_{i-1}))

with abar_{i-1} where step i lands: diffusers steps from t_i to t_i - T // N, the next grid
point on leading spacing and on trailing spacing where N divides T, beside it otherwise (linspace
spacing; trailing with N not dividing T), and the trajectory follows diffusers there too.

Where each step lands on the next grid point, in y = x / alpha, rho = sigma / alpha this is
y_{i-1} = y_i + beta_i eps_i + (s_i/alpha_{i-1}) xi_i with beta_i = b_i / alpha_{i-1}
(= rho_{i-1} - rho_i when eta = 0): one Euler step of the probability-flow ODE
dy/drho = eps(alpha(rho) y, t(rho), c).

The step is affine, so configurations whose DDIMScheduler.step is not (`nonaffine_problem`):
clip_sample (x_0 clipped to +-clip_sample_range; true is DDIMScheduler's default where a
configuration lacks the key) and thresholding (dynamic thresholding of x_0), are refused by a
task's preflight (`Sampler.config_problem`), before anything runs; a schedule read from such a
configuration in code (`Schedule.from_scheduler(DDIMScheduler(), N)`) takes the unclipped step
and says so with a warning.
"""

from __future__ import annotations

import warnings

import math
from dataclasses import dataclass

from bench.chain import AffineStep, VPSchedule
from bench.errors import SpecError
from bench.samplers import Sampler, check_steps_argument


@dataclass(frozen=True)
class DDIMSchedule(AffineStep, VPSchedule):
    alpha_bar_prev: tuple[float, ...] = ()  # where step i lands, at [i - 1]: abar_{i-1} on leading
    #                                         grids and trailing ones with N dividing T, not on linspace
    #                                         grids nor trailing ones with N not dividing T
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
        problem = nonaffine_problem(scheduler.config)
        if problem:
            warnings.warn(f"{problem}; this schedule takes the step without it", stacklevel=2)
        train = scheduler.config.num_train_timesteps
        check_steps_argument(num_steps, train)
        scheduler.set_timesteps(num_steps)
        table = scheduler.alphas_cumprod.double()
        final = float(scheduler.final_alpha_cumprod)
        ts = [int(t) for t in scheduler.timesteps]  # descending: t_N, ..., t_1
        ratio = train // num_steps
        # DDIMScheduler.step goes from abar[t] to abar[t - T // N] (the final value below 0): the
        # next grid timestep on leading spacing and on trailing spacing with N dividing T (the grid
        # is then one ODE's Euler grid), beside it on linspace spacing and on trailing spacing with
        # N not dividing T (999 -> 749 with 666 next at N = 4 on linspace). `prev` is where it lands.
        abar = [float(table[t]) for t in reversed(ts)]  # abar_i for i = 1..N
        prev = [float(table[t - ratio]) if t - ratio >= 0 else final for t in reversed(ts)]
        return cls(
            timesteps=tuple(float(t) for t in reversed(ts)),
            alpha_bar=(prev[0], *abar),
            train_alpha_bar=tuple(float(v) for v in table),
            alpha_bar_prev=tuple(prev),
            eta=float(eta),
        )

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
        """beta_i = b_i / alpha_{i-1}, alpha_{i-1} where step i lands: the eps coefficient of the
        step in y = x / alpha (rho_{i-1} - rho_i at eta = 0 where the step lands on the next grid
        point; then y_0 = y_N + sum_i beta_i eps_i + noise)."""
        return self.coefficients(i)[1] / math.sqrt(self.alpha_bar_prev[i - 1])

    # state_weight and output_weight(i) are Schedule's: the step rule run on coefficient vectors,
    # products of the a_i and b_i above. The ODE view's W_x = alpha_0 / alpha_N and
    # W_i = alpha_0 beta_i equals them only where every step lands on the next grid point; where
    # steps land beside them it is off: by 3.9 % on trailing spacing at N = 16 (state_weight 157.40
    # against 151.54, diffusers' default linear betas), by a factor 2.6 on linspace spacing at N = 4
    # (157.40 against 61.00; 157.40 against 130.19 at N = 25).

    # step and advance: AffineStep's, on these coefficients


# DDIMScheduler options that make its step non-affine in (x_i, eps): the chain cannot take them.
NONAFFINE = {
    "clip_sample": "DDIMScheduler clips its x_0 prediction to +-clip_sample_range",
    "thresholding": "DDIMScheduler thresholds its x_0 prediction dynamically",
}


def nonaffine_problem(config) -> str | None:
    """Why the scheduler configuration turns on an option of NONAFFINE (an absent key counts as
    DDIMScheduler's default: clip_sample is true there), in one line that says what to do; or None."""
    defaults = {"clip_sample": True, "thresholding": False}
    for key, what in NONAFFINE.items():
        value = config.get(key, defaults[key])
        if value:
            return (
                f"ddim: {key}={value!r} in the scheduler configuration ({what}, which an affine "
                f"step cannot reproduce); set {key} false in the model's scheduler_config.json"
                + (" (a configuration without the key gets DDIMScheduler's default, true)" if defaults[key] else "")
            )
    return None


class DDIM(Sampler):
    name = "ddim"
    summary = "DDIM (eta >= 0 from the task's eta option): diffusers' DDIMScheduler"
    prediction = "epsilon"
    stochastic = True
    scheduler_class = "DDIMScheduler"

    def config_problem(self, config: dict) -> str | None:
        return nonaffine_problem(config)

    def schedule_from(self, scheduler, steps: int, eta: float) -> DDIMSchedule:
        return DDIMSchedule.read(scheduler, steps, eta)
