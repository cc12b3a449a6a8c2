"""toy: a Gaussian mixture in d dimensions with the exact closed-form denoiser (no training).

Data: p_0 = sum_k w_k N(mu_k + shift, s^2 I) with w = softmax(logits + offsets). Noised by
x_t = alpha x_0 + sigma eps it stays a mixture, N(alpha (mu_k + shift), (alpha^2 s^2 + sigma^2) I),
so the optimal noise prediction is exact:

    eps(x, t, c) = -sigma * grad_x log p_t(x) = sigma * sum_k gamma_k(x) (x - alpha mu_k') / v_k

with gamma_k the posterior responsibilities and v_k = alpha^2 s^2 + sigma^2.
theta (the `weights` target) is (mu, logits); the conditioning c = [offsets (K), shift (d)]
selects components and shifts them. Everything runs in float64: this is where estimators are
checked against the exact gradient.
"""

from __future__ import annotations

import functools
import math

import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from bench.capabilities import FEW_STEP_CHAIN
from bench.chain import Chain, alpha_bar_at_time
from bench.options import Option, at_least
from bench.problem import Problem
from bench.rewards import REWARDS
from tasks.base import Task, sampler_option

# Stable Diffusion 1.x's noise levels, with trailing spacing: every N starts at t = 999, so runs at
# different N integrate the same ODE interval (with leading spacing t_N moves: 901 at N = 10, 991 at
# N = 100, 799 at N = 400) and a convergence study in N compares like with like.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
    timestep_spacing="trailing",
)

VECTOR = REWARDS.domain("vector", "points", "(B, d) points of R^d")
RADIUS, TEMPERATURE = 0.5, 0.1  # the target ball between the first two modes, and its softness


def _target_distance2(task: Toy, x: Tensor) -> Tensor:
    """|x - c|^2 in the ring's plane: extra dimensions change the cost, not the goal."""
    plane = min(task.d, 2)
    center = task.center[:plane].to(x)
    return ((x[:, :plane] - center) ** 2).sum(-1)


def _region(task: Toy):
    return lambda x: nn.functional.logsigmoid((RADIUS**2 - _target_distance2(task, x)) / TEMPERATURE)


def _distance(task: Toy):
    return lambda x: -_target_distance2(task, x)


def _inside(task: Toy):
    return lambda x: (_target_distance2(task, x) < RADIUS**2).to(x.dtype)


REWARDS.register(
    "region",
    domain=VECTOR,
    description="log soft-probability of the ball between the toy's first two modes (log sigmoid)",
    factory=_region,
)
REWARDS.register("distance", domain=VECTOR, description="-|x - c|^2 to the toy's target point", factory=_distance)
REWARDS.register(
    "inside", domain=VECTOR, description="1 in the toy's target ball, else 0 (not differentiable)", factory=_inside
)


class MixtureDenoiser(nn.Module):
    """The exact model output for a Gaussian mixture, differentiable in x, t-free parameters and c:
    eps-prediction on the variance-preserving table (x_t = alpha x_0 + sigma noise, abar(t)
    interpolated in log), or with `flow_timesteps` = T the rectified-flow velocity noise - x_0 of
    x_s = (1 - s) x_0 + s noise at s = t / T."""

    def __init__(
        self, means: Tensor, logits: Tensor, std: float, train_alpha_bar: Tensor, flow_timesteps: int | None = None
    ) -> None:
        super().__init__()
        self.means = nn.Parameter(means.clone())
        self.logits = nn.Parameter(logits.clone())
        self.std = std
        self.flow_timesteps = flow_timesteps
        self.register_buffer("train_alpha_bar", train_alpha_bar.clone())

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        k, d = self.means.shape
        offsets, shift = (cond[..., :k], cond[..., k:]) if cond is not None else (0.0, 0.0)
        if self.flow_timesteps:
            sigma = (t.to(x.dtype) / self.flow_timesteps)[:, None, None]  # (B, 1, 1)
            alpha = 1 - sigma
        else:
            abar = alpha_bar_at_time(t, self.train_alpha_bar).to(x.dtype)[:, None, None]
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        means = self.means + shift
        centers = alpha * means  # (B, K, d)
        var = alpha**2 * self.std**2 + sigma**2  # (B, 1, 1)
        diff = x[:, None, :] - centers
        log_w = torch.log_softmax(self.logits + offsets, dim=-1)
        log_p = log_w - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * d * torch.log(2 * math.pi * var[..., 0])
        gamma = torch.softmax(log_p, dim=-1)[..., None]  # (B, K, 1)
        eps = sigma[:, 0] * (gamma * diff / var).sum(1)  # E[noise | x]
        if not self.flow_timesteps:
            return eps
        # E[x_0 | x] per component: m + alpha std^2 (x - alpha m) / var (finite at alpha = 0 too)
        x0 = (gamma * (means + alpha * self.std**2 * diff / var)).sum(1)
        return eps - x0


class Toy(Task):
    name = "toy"
    summary = "Gaussian mixture with the exact closed-form denoiser (float64, no training)"
    version = "1"
    dtype = torch.float64
    train_timesteps = SCHEDULER_CONFIG["num_train_timesteps"]
    learning_rates = {"latent": 0.05, "cond": 0.05, "weights": 0.02, "noise": 0.05}
    options = (
        Option("d", int, 2, "dimension", check=at_least(1)),
        Option("modes", int, 8, "mixture components (a ring of radius 2 in the first two axes)", check=at_least(1)),
        Option("std", float, 0.5, "standard deviation of each component (smaller: stiffer ODE)", check=at_least(1e-3)),
        Option("batch", int, 16, "samples per problem", check=at_least(1)),
        Option("eta", float, 0.0, "DDIM eta (0: deterministic ODE sampler)", check=at_least(0.0)),
        Option(
            "spacing",
            str,
            "trailing",
            "the scheduler's timestep_spacing (leading with offset=0 "
            "ends on an identity step, as DDIMScheduler's defaults do)",
            choices=("trailing", "leading", "linspace"),
        ),
        Option("offset", int, 0, "the scheduler's steps_offset", check=at_least(0)),
        Option(
            "alpha_to_one",
            bool,
            False,
            "the scheduler's set_alpha_to_one (true: the last step lands on abar = 1 and injects no noise)",
        ),
        sampler_option(),
        REWARDS.option(
            VECTOR,
            "region",
            "a reward of the points (python -m bench list): region, log soft-probability of a ball "
            "between two modes; distance, -|x-c|^2; inside, 1 in the ball, else 0 (not "
            "differentiable; all in the ring's plane); or module:function / file.py:function",
        ),
    )

    @property
    def model_prediction(self) -> str:
        """The closed-form model serves any sampler: epsilon, or the velocity for flow samplers."""
        from bench.samplers import make_sampler

        return make_sampler(self.sampler).prediction if self.sampler else "epsilon"

    def scheduler_config(self) -> dict:
        return {
            **SCHEDULER_CONFIG,
            "timestep_spacing": self.spacing,
            "steps_offset": self.offset,
            "set_alpha_to_one": self.alpha_to_one,
        }

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self.scheduler = DDIMScheduler(**self.scheduler_config())
        angles = torch.arange(self.modes, dtype=torch.float64) * 2 * math.pi / self.modes
        means = torch.zeros(self.modes, self.d, dtype=torch.float64)
        if self.d == 1:
            means[:, 0] = torch.linspace(-2, 2, self.modes, dtype=torch.float64)
        else:
            means[:, 0], means[:, 1] = 2 * angles.cos(), 2 * angles.sin()
        self.means = means
        # The target lies between the first two modes (off the data), where no sample starts.
        self.center = (means[0] + means[1]) / 2 if self.modes > 1 else means[0] + 1.0
        self.train_alpha_bar = self.scheduler.alphas_cumprod.double()
        self._reward = REWARDS.build(self.reward, self, VECTOR)

    def preflight(self) -> None:
        super().preflight()
        REWARDS.preflight(self.reward, self, VECTOR)

    def code_objects(self) -> tuple:
        """The sampler and the reward, resolved by name: their code is in the cells' keys."""
        return super().code_objects() + REWARDS.code_objects(self.reward, VECTOR)

    def reward_of(self, x: Tensor) -> Tensor:
        """Per-sample reward of final samples x_0 (B, d): the `reward` option's, from the registry."""
        return self._reward(x)

    def make_problem(self, target: str, steps: int, seed: int, dtype: torch.dtype | None = None) -> Problem:
        self.check_target(target)
        dtype = dtype or self.dtype
        device = self.device
        flow = SCHEDULER_CONFIG["num_train_timesteps"] if self.model_prediction == "flow" else None
        denoiser = MixtureDenoiser(
            self.means, torch.zeros(self.modes, dtype=torch.float64), self.std, self.train_alpha_bar, flow
        ).to(device=device, dtype=dtype)
        denoiser.train_alpha_bar = self.train_alpha_bar.to(device)  # the table stays float64
        generator = torch.Generator().manual_seed(seed)
        x_start = torch.randn(self.batch, self.d, generator=generator, dtype=torch.float64)
        noises = None
        if self.eta > 0:
            noises = [
                torch.randn(self.batch, self.d, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
                for _ in range(steps)
            ]
        x_start = x_start.to(device=device, dtype=dtype)
        cond = torch.zeros(self.modes + self.d, device=device, dtype=dtype)
        schedule = self.make_schedule(steps)
        for p in denoiser.parameters():
            p.requires_grad_(target == "weights")
        leaves = self.leaves_for(target, x_start, cond, noises, denoiser)
        problem = Problem(
            chain=Chain(denoiser, schedule),
            x_start=x_start,
            cond=cond,
            noises=noises,
            reward_fn=self.reward_of,
            target=target,
            leaves=leaves,
        )
        if self.eta == 0:  # a stand-in student for shortcut-model: the toy's own model on K steps
            problem.extras[FEW_STEP_CHAIN] = functools.cache(
                lambda k: Chain(denoiser, self.make_schedule(k), counter=problem.chain.counter)
            )
        return problem

    def offers(self) -> dict[str, object]:
        """shortcut-model's student here is the toy's exact model on a K-step grid of its sampler:
        not distilled, so it follows the long chain only as well as K steps do; it exercises the
        estimator's path (the conformance suite) with a known answer (full at N = K)."""
        return {FEW_STEP_CHAIN: list(range(1, 65))}
