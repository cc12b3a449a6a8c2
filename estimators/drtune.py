"""drtune: deep reward supervision with stopped denoiser inputs (DRTune, Wu et al. 2024, "Deep
Reward Supervisions for Tuning Text-to-Image Diffusion Models", its training objective;
docs/estimators/drtune.md).

Every denoiser input is detached, so no gradient runs back through a call into the state it
read; the sampler's affine arithmetic stays differentiable. Only K calls, spread over the whole
trajectory at a stride of N / K from a random offset, keep their graph; the others run without
one. With the sampler's linear weights (x_0 = W_x x_N + sum_i W_i out_i, Schedule.state_weight
and output_weight):

    dx_0/dtheta ~ sum_{k in A} W_k d out_k(sg(x_k)) / dtheta,    dx_0/dx_N ~ W_x I,

computed as x_0 = x_0^ng + W_x (x_N - sg(x_N)) + sum_{k in A} W_k (out_k - sg(out_k)). With K = N
this is the gradient of the chain with every Jacobian of a call in its input set to zero: exact
where the outputs do not depend on the state. `sdo` is the point K = 1 with its kept call's input
left attached. Memory K A, time N F + K V (no VJP for the latent and the injected noises: their
paths are linear).
"""

from __future__ import annotations

import random

import torch

from bench.chain import noise_for
from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop


def spread(effective: tuple[int, ...], k: int, rng: random.Random | None) -> list[int]:
    """Grid indices of K calls (all of them where K exceeds their number) at positions offset + j n / K
    (j = 0..K-1) among the n calls whose output enters x_0 (Schedule.effective_steps), in sampling
    order; the offset is drawn uniformly in [0, n / K) from `rng`, or 0 without one."""
    n = len(effective)
    k = min(k, n)
    stride = n / k
    offset = rng.random() * stride if rng is not None else 0.0
    return [effective[min(int(offset + j * stride), n - 1)] for j in range(k)]


class DRTune(Estimator):
    name = "drtune"
    plot_style = ("#bcbd22", "P")
    summary = "DRTune: stopped denoiser inputs, K graph calls spread over the trajectory"
    options = (
        Option(
            "k",
            int,
            5,
            "calls that keep their graph, spread at a stride of N / K (all N where K > N)",
            check=at_least(1),
        ),
        Option(
            "offset",
            str,
            "random",
            "random: a fresh offset in [0, stride) per call; first: the kept calls start at the first",
            choices=("random", "first"),
        ),
    )
    variants = ("k=1,offset=first", "k=3")

    @property
    def random_counts(self) -> bool:
        return False  # K calls keep a graph whatever the offset

    def kept(self, effective: tuple[int, ...], rng: random.Random | None) -> list[int]:
        return spread(effective, self.k, rng if self.offset == "random" else None)

    def cost(self, steps: int, target: str) -> Cost:
        return self._cost(steps, min(self.k, steps), target)

    def cost_for(self, problem: Problem) -> Cost:
        effective = len(problem.chain.schedule.effective_steps())
        return self._cost(problem.num_steps, min(self.k, effective), problem.target)

    @staticmethod
    def _cost(steps: int, keep: int, target: str) -> Cost:
        if target in ("latent", "noise"):  # the linear path alone: no call reads them with its graph
            return Cost(nfe_forward=steps, nfe_vjp=0, memory="S", activations=0, latents=1)
        later = 1.0 if keep < steps else 0.0  # graph-free calls run while kept graphs are alive
        return Cost(nfe_forward=steps, nfe_vjp=keep, memory="K·A", activations=keep, working=later)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        kept = set(self.kept(schedule.effective_steps(), rng))
        x_start = problem.x_start
        state = schedule.start(x_start.detach())
        kept_path = 0.0
        for i in range(schedule.num_steps, 0, -1):
            if i in kept and problem.target not in ("latent", "noise"):
                out = chain.eps(state[0].detach(), i, cond)
                kept_path = kept_path + schedule.output_weight(i) * (out - out.detach())
                out = out.detach()
            else:
                with torch.no_grad():
                    out = chain.eps(state[0], i, cond)
            state = schedule.advance(state, i, out, noise_for(problem.noises, i))
        identity_path = schedule.state_weight * (x_start - x_start.detach())
        return backprop(problem, state[0] + identity_path + kept_path)
