"""flowbp: reward backpropagation through a surrogate backward trajectory, its design axes as options
(FlowBP, Wang et al. 2026, "Exploring the Design Space of Reward Backpropagation for Flow
Matching"; docs/estimators/flowbp.md).

One pass of the sampler: the calls of an active set A re-forward with their graph, every other
call's output is the cached, detached value. The surrogate's states z_i follow the sampler's own
affine step from z_N = x_N, so their forward values are the rollout's, and the gradient reaches
the parameters only through the active calls. The four axes:

- `reward_input`: x0, the reward on the surrogate's x_0 (= the rollout's); or mean, on the
  model's clean estimate at the last active call (ReFL's input), where the pass stops.
- `active`: K calls (`k`) spread at a stride of N / K from `offset` (random or first), as DRTune;
  k = 0 (or K > N) for every call.
- `weights`: euler, each active call carries its own step's weight W_i in
  x_0 = W_x x_N + sum_i W_i out_i (Schedule.output_weight); lagrange, every step's output is read
  as the linear interpolant of the active outputs in the ODE variable s (constant beyond the end
  nodes), so an active call carries the weights of the steps around it:
  w_a = sum_i W_i l_a(s_i), with l_a the piecewise-linear basis on the active nodes.
- `bridge`: c in [0, 1], how much of the surrogate state an active call reads with its graph:
  input = c z_i + (1 - c) sg(z_i). c = 0 stops every input (one factor per path, as DRTune);
  c = 1 chains the calls' input Jacobians between active calls.

Points of the space that are other estimators (tested): every call active, euler, bridge 1 is
`full`; K spread from first, euler, bridge 0 is `drtune[offset=first]`; K = 1 at the first call,
euler, bridge 1 is `sdo[step=first]`; reward_input mean with the one active call is `refl` at the
same step. lagrange reads the active outputs across steps, so it takes bridge 0 only. Memory K A,
time N F + K V (fewer forwards where the mean input stops the pass).
"""

from __future__ import annotations

import random

import torch

from bench.chain import noise_for
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop
from estimators.drtune import spread


def _bridge(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1] (0: every call's input stopped; 1: coupled)"


def lagrange_weights(schedule, active: list[int]) -> dict[int, float]:
    """w_a = sum_i W_i l_a(s_i): each step's output weight spread over the active nodes by the
    piecewise-linear interpolant in the ODE variable s (constant outside the nodes' range)."""
    nodes = sorted(active, key=schedule.ode_point)  # ascending s
    points = [schedule.ode_point(a) for a in nodes]
    weights = dict.fromkeys(active, 0.0)
    for i in range(1, schedule.num_steps + 1):
        w, s = schedule.output_weight(i), schedule.ode_point(i)
        if s <= points[0] or len(nodes) == 1:
            weights[nodes[0] if s <= points[0] else nodes[-1]] += w
            continue
        if s >= points[-1]:
            weights[nodes[-1]] += w
            continue
        upper = next(n for n, p in enumerate(points) if p >= s)
        lo, hi = points[upper - 1], points[upper]
        t = (s - lo) / (hi - lo)
        weights[nodes[upper - 1]] += w * (1 - t)
        weights[nodes[upper]] += w * t
    return weights


class FlowBP(Estimator):
    name = "flowbp"
    plot_style = ("#7f7f7f", "*")
    summary = "FlowBP: a surrogate backward trajectory (reward input, active set, weights, bridge)"
    options = (
        Option(
            "reward_input",
            str,
            "x0",
            "x0: the surrogate's x_0; mean: the last active call's clean estimate",
            choices=("x0", "mean"),
        ),
        Option("k", int, 4, "active calls, spread at a stride of N / K (0, or K > N: every call)", check=at_least(0)),
        Option(
            "offset", str, "random", "where the spread starts: random (per call) or first", choices=("random", "first")
        ),
        Option(
            "weights",
            str,
            "euler",
            "euler: each active call its own step's weight; lagrange: interpolated",
            choices=("euler", "lagrange"),
        ),
        Option("bridge", float, 0.0, "share of the surrogate state an active call reads with its graph", check=_bridge),
    )
    variants = ("k=0,bridge=1", "weights=lagrange", "reward_input=mean,k=1,offset=first", "bridge=0.5")

    def __init__(self, **values):
        super().__init__(**values)
        if self.weights == "lagrange" and self.bridge > 0:
            raise SpecError(
                f"{self.spec}: weights=lagrange reads active outputs across steps, so an active call cannot "
                "read the surrogate state with its graph; use bridge=0"
            )
        if self.weights == "lagrange" and self.reward_input == "mean":
            raise SpecError(f"{self.spec}: reward_input=mean scores one call's estimate; weights do not apply")

    @property
    def samples_long_chain(self) -> bool:  # the mean input stops the pass at the last active call
        return self.reward_input == "x0"

    def active_set(self, effective: tuple[int, ...], rng: random.Random | None) -> list[int]:
        """Grid indices of the active calls in sampling order (drtune's spread; k = 0: every call)."""
        return spread(effective, self.k or len(effective), rng if self.offset == "random" else None)

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.target in ("latent", "noise") and self.reward_input == "mean" and self.bridge == 0:
            return f"the clean estimate of a stopped input does not depend on the {problem.target}"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        k = steps if self.k == 0 else min(self.k, steps)
        forwards = float(steps)
        if self.reward_input == "mean":  # the pass stops at the last active call (at offset 0)
            forwards = float(int((k - 1) * steps / k) + 1)
        return self._cost(forwards, k, steps, target)

    def cost_for(self, problem: Problem) -> Cost:
        effective = problem.chain.schedule.effective_steps()
        active = self.active_set(effective, None)
        forwards = float(problem.num_steps)
        if self.reward_input == "mean":
            forwards = float(problem.num_steps - active[-1] + 1)
        return self._cost(forwards, len(active), problem.num_steps, problem.target)

    def _cost(self, forwards: float, k: int, steps: int, target: str) -> Cost:
        # with stopped inputs the latent and the noises reach x_0 by the linear path alone
        linear_only = target in ("latent", "noise") and self.bridge == 0
        vjp = 0.0 if linear_only else float(k)
        return Cost(
            nfe_forward=forwards,
            nfe_vjp=vjp,
            memory="S" if linear_only else "K·A",
            activations=0.0 if linear_only else float(k),
            latents=1.0 if linear_only else 0.0,
            working=1.0 if k < steps else 0.0,
        )

    @property
    def random_counts(self) -> bool:
        return self.reward_input == "mean" and self.offset == "random"

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
        active = self.active_set(schedule.effective_steps(), rng)
        chosen, last = set(active), active[-1]
        shares = lagrange_weights(schedule, active) if self.weights == "lagrange" else None
        c = self.bridge
        x_start = problem.x_start
        z = schedule.start(x_start if c > 0 else x_start.detach())
        moved = 0.0  # lagrange: the active outputs' paths, added to the rollout's x_0
        for i in range(schedule.num_steps, 0, -1):
            if i in chosen:
                state = z[0]
                into = state if c == 1 else c * state + (1 - c) * state.detach() if c > 0 else state.detach()
                out = chain.eps(into, i, cond)
                if self.reward_input == "mean" and i == last:
                    scored = schedule.clean_estimate(state if c > 0 else state.detach(), i, out)
                    break
                if shares is not None:
                    moved = moved + shares[i] * (out - out.detach())
                    out = out.detach()
            else:
                with torch.no_grad():
                    out = chain.eps(z[0], i, cond)
            z = schedule.advance(z, i, out, noise_for(problem.noises, i))
        else:
            scored = z[0]
        if c == 0 and self.reward_input == "x0":
            scored = scored + schedule.state_weight * (x_start - x_start.detach()) + moved
        return backprop(problem, scored)
