"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095), diffusers'
DPMSolverMultistepScheduler with algorithm_type = dpmsolver++ and the midpoint solver type.

With lambda = log(alpha / sigma), h = lambda_{i-1} - lambda_i and the data prediction
D_i = (x_i - sigma_i eps_i) / alpha_i, the first-order step (= DDIM) is

    x_{i-1} = (sigma_{i-1} / sigma_i) x_i + alpha_{i-1} (1 - e^{-h}) D_i,

and the second-order multistep step (algorithm 2) replaces D_i by D_i + (D_i - D_{i+1}) / (2 r),
r = h_prev / h, with D_{i+1} the previous step's data prediction: the state's history. Steps run
first order where diffusers' do: the first and the last (lower_order_final with N < 15, or the
final sigma 0, diffusers' default).
The grid: diffusers' timesteps (spacing from the config, linspace by default) with rho_i read from
its table, ending at rho_0 = 0 (final_sigmas_type = zero) or rho(t = 0) (sigma_min)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from bench.chain import State, VPSchedule
from bench.errors import SpecError
from bench.options import Option
from bench.samplers import Sampler, check_steps_argument


@dataclass(frozen=True)
class DPMSolverSchedule(VPSchedule):
    rhos: tuple[float, ...] = ()  # rho_i for i = 0..N as diffusers holds them (float32 values)
    orders: tuple[int, ...] = ()  # the order of step i at [i - 1]
    sampler: str = "dpmpp2m"

    @property
    def history_size(self) -> int:  # type: ignore[override]
        return 1 if max(self.orders, default=1) > 1 else 0

    @classmethod
    def read(cls, scheduler, num_steps: int) -> "DPMSolverSchedule":
        config = scheduler.config
        problems = [
            f"{key}={config.get(key)!r} (valid: {valid})"
            for key, valid in (
                ("algorithm_type", "dpmsolver++"),
                ("solver_type", "midpoint"),
                ("prediction_type", "epsilon"),
            )
            if config.get(key) != valid
        ]
        problems += [
            f"{key}=True (valid: False)"
            for key in (
                "thresholding",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "use_flow_sigmas",
            )
            if config.get(key)
        ]
        if config.get("solver_order") not in (1, 2):
            problems.append(f"solver_order={config.get('solver_order')!r} (valid: 1, 2)")
        if problems:
            raise SpecError("DPM-Solver++ scheduler configuration not supported: " + "; ".join(problems))
        check_steps_argument(num_steps, config.num_train_timesteps)
        scheduler.set_timesteps(num_steps)
        ts = [int(t) for t in scheduler.timesteps]  # t_N, ..., t_1
        if len(ts) != num_steps:
            raise SpecError(f"DPM-Solver++ made {len(ts)} timesteps for N={num_steps}")
        sigmas = [float(s) for s in scheduler.sigmas]  # rho at sampling index k = N - i, then the final
        rhos = tuple(reversed(sigmas))  # rho_i for i = 0..N
        n = num_steps
        final_low = (
            config.get("euler_at_final")
            or (config.get("lower_order_final") and n < 15)
            or config.get("final_sigmas_type") == "zero"
        )
        # in sampling order k = N - i, as DPMSolverMultistepScheduler.step decides (its
        # lower_order_second matters for order 3 only)
        orders = [1 if config.solver_order == 1 or k == 0 or (k == n - 1 and final_low) else 2 for k in range(n)]
        table = tuple(float(v) for v in scheduler.alphas_cumprod.double())
        alpha_bar = tuple(1.0 / (1.0 + r * r) for r in rhos)
        return cls(
            timesteps=tuple(float(t) for t in reversed(ts)),
            alpha_bar=alpha_bar,
            train_alpha_bar=table,
            rhos=rhos,
            orders=tuple(reversed(orders)),
        )

    def rho(self, i: int) -> float:
        return self.rhos[i]

    def alpha(self, i: int) -> float:
        return 1.0 / math.sqrt(1.0 + self.rhos[i] ** 2)

    def sigma(self, i: int) -> float:
        return self.rhos[i] * self.alpha(i)

    def _lambda(self, i: int) -> float:
        return math.inf if self.rhos[i] == 0 else -math.log(self.rhos[i])

    def multistep_coefficients(self, i: int) -> tuple[float, float, float]:
        """(c_x, c_D, c_prev) of step i: x_{i-1} = c_x x_i + c_D D_i + c_prev D_{i+1}."""
        h = self._lambda(i - 1) - self._lambda(i)
        c_x = self.sigma(i - 1) / self.sigma(i)
        m = self.alpha(i - 1) * -math.expm1(-h)  # alpha_{i-1} (1 - e^{-h}); e^{-inf} = 0 at sigma = 0
        if self.orders[i - 1] == 1:
            return c_x, m, 0.0
        r = (self._lambda(i) - self._lambda(i + 1)) / h
        return c_x, m * (1 + 0.5 / r), -m * 0.5 / r

    def advance(self, state: State, i: int, out: Tensor, noise: Tensor | None = None) -> State:
        x = state[0]
        data = (x - self.sigma(i) * out) / self.alpha(i)
        c_x, c_d, c_prev = self.multistep_coefficients(i)
        x_next = c_x * x + c_d * data
        if c_prev != 0.0:
            x_next = x_next + c_prev * state[1]
        return (x_next, data) if self.history_size else (x_next,)


class DPMSolverPP(Sampler):
    name = "dpmpp2m"
    summary = "DPM-Solver++ multistep (order 2, midpoint): diffusers' DPMSolverMultistepScheduler"
    prediction = "epsilon"
    scheduler_class = "DPMSolverMultistepScheduler"
    options = (
        Option("order", int, 2, "solver order (1: DDIM in lambda, 2: DPM-Solver++ 2M)", choices=(1, 2)),
        Option("lower_order_final", bool, True, "first order at the last steps (diffusers' default)"),
    )

    def scheduler_config(self) -> dict:
        return {
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "solver_order": self.order,
            "lower_order_final": self.lower_order_final,
        }

    def schedule_from(self, scheduler, steps: int, eta: float) -> DPMSolverSchedule:
        return DPMSolverSchedule.read(scheduler, steps)
