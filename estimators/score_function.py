"""score-function: the likelihood-ratio (REINFORCE) estimator of DDPO (arXiv 2305.13301;
docs/estimators/index.md). No backprop through the chain, and the reward need not be
differentiable.

With eta > 0 every step is Gaussian, p(x_{i-1} | x_i) = N(mu_i, s_i^2 I) with
mu_i = a_i x_i + b_i eps(x_i, t_i, c). For a sampled trajectory,

    grad E[R] = E[ sum_i grad log p(x_{i-1} | x_i) (R - b) ],
    log p(x_{i-1} | x_i) = -||x_{i-1} - mu_i||^2 / (2 s_i^2) + const,

where the baseline b does not change the expectation: `loo` (leave-one-out batch mean; keeps
the estimate unbiased), `mean` (batch mean, DDPO's choice, O(1/B) biased), `group` ((R - mean) /
std over the batch, Flow-GRPO's group-normalised advantage: the mean's direction, rescaled) or
`none`. `logp`: each step's log-density summed over the sample's D dimensions (the density's
own) or their mean (Flow-GRPO's): the same direction, 1/D the length. The
trajectory is sampled without graph (fresh injected noise from the estimator's rng, or the
problem's own with fresh=false), then each step's mean is recomputed with its graph and
backpropagated at once: memory A, time 2NF + NV.

PPO (DDPO's default): with clip = epsilon > 0, the surrogate is
-min(r A, clip(r, 1 - eps, 1 + eps) A) with r = p_theta / p_old per step. On freshly sampled data
r = 1 and the gradient equals REINFORCE's; with reuse = k the sampled trajectories and their
old log-probabilities serve k consecutive calls on the same problem (DDPO's inner epochs), and
clipping bounds how far the later calls move. Those calls sample nothing and return the rewards
of the reused samples.

On the flow-sde sampler (bench/samplers/flow_sde.py: the flow ODE as a marginal-preserving SDE,
its noise level the task's eta) this is Flow-GRPO's policy gradient, e.g.
score-function[baseline=group,logp=mean,clip=0.2] on digits[model=flow,sampler=flow-sde,eta=0.7];
the group is the problem's batch (one prompt or class per problem).

A step that injects no noise (s_i = 0: set_alpha_to_one = True makes the last step so, and an
identity step is one) has no density. Such steps at the end of the chain are a deterministic map
x_0 = g(x_m) of the last stochastic state, so R(g(x_m)) is the reward and its parameter dependence
is a pathwise term added to the score term: grad E[R] = E[grad log p(tau) (R - b)] + E[grad R(g(x_m))]
(only where g depends on the target; it needs a differentiable reward, else the cell is skipped).
A deterministic step before a stochastic one has neither, and is a skip reason.

ode=frozen is MixGRPO's and Flow-GRPO-Fast's reading of a sampler whose SDE covers a window of
steps (flow-sde[window=w,start=k]): the steps without noise are part of the environment, so the
gradient is the score term of the window's steps alone, E[sum_{i in W} grad log p(x_{i-1} | x_i)
(R - b)], with neither the pathwise term of the steps after the window nor the dependence of the
window's first state on the target through the steps before it. That is the gradient of E[R] only
where those terms vanish (every step in the window; or the steps outside it do not depend on the
target); otherwise it is biased, by design: fewer steps scored, fewer calls."""

from __future__ import annotations

import random
import weakref

import torch

from bench.chain import noise_for
from bench.errors import SkipCell
from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator
from estimators.randomness import torch_generator


def _clip_range(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1) (0: no PPO clipping)"


class ScoreFunction(Estimator):
    name = "score-function"
    reward_gradient = False  # the reward is only evaluated
    plot_style = ("#9467bd", "X")  # colour and marker in every figure
    summary = "REINFORCE / DDPO likelihood ratio on the eta > 0 sampler; reward may be non-differentiable"
    options = (
        Option(
            "baseline",
            str,
            "loo",
            "loo: leave-one-out mean (unbiased); mean: batch mean; group: (R - mean) / std, Flow-GRPO's "
            "group-normalised advantage; none",
            choices=("loo", "mean", "group", "none"),
        ),
        Option(
            "logp",
            str,
            "sum",
            "each step's log-probability summed over the sample's dimensions, or their mean (Flow-GRPO's)",
            choices=("sum", "mean"),
        ),
        Option(
            "ode",
            str,
            "exact",
            "steps without noise: exact (a pathwise term through the final ones; one before a noisy step "
            "is a skip) or frozen (MixGRPO / Flow-GRPO-Fast: the environment, no gradient through them)",
            choices=("exact", "frozen"),
        ),
        Option("fresh", bool, True, "draw fresh injected noise each call (false: the problem's own)"),
        Option("clip", float, 0.0, "PPO clip range epsilon (0: plain REINFORCE)", check=_clip_range),
        Option(
            "reuse",
            int,
            1,
            "calls served by one sampled batch (DDPO's inner epochs; needs clip > 0)",
            check=at_least(1),
        ),
    )
    variants = (
        "baseline=mean",
        "baseline=none,fresh=false",
        "clip=0.2,reuse=2",
        "clip=0.1,reuse=3",
        "baseline=group,logp=mean,clip=0.2",
        "ode=frozen",
    )

    def __init__(self, **values):
        super().__init__(**values)
        self._batch: dict | None = None  # the sampled trajectories being reused

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.chain.schedule.eta <= 0:
            return "the score function needs a stochastic sampler (eta > 0; DDPO uses eta = 1)"
        if problem.target == "noise":
            return "the score function treats the injected noise as random draws, not as parameters"
        schedule = problem.chain.schedule
        stochastic = _stochastic_steps(schedule)
        if not stochastic:
            return "no step of this schedule injects noise (every s_i = 0): the chain has no density"
        if self.ode == "frozen":
            if problem.target == "latent" and stochastic[0] != schedule.num_steps:
                return "with ode=frozen the latent reaches the first noisy step only through frozen steps"
            return None
        inside = [i for i in range(schedule.num_steps, stochastic[-1], -1) if i not in stochastic]
        if inside:
            return (
                f"step {inside[0]} injects no noise (s_i = 0) but a noisy step follows it: the "
                "trajectory has no density there and no pathwise term is taken (ode=frozen scores "
                "the noisy steps alone, as MixGRPO and Flow-GRPO-Fast do)"
            )
        return None

    def cost(self, steps: int, target: str) -> Cost:
        scored = 1 if target == "latent" else steps  # x_N enters only the first transition
        return Cost(nfe_forward=steps / self.reuse + scored, nfe_vjp=scored, memory="A", activations=1)

    def cost_for(self, problem: Problem) -> Cost:
        schedule, target = problem.chain.schedule, problem.target
        stochastic = _stochastic_steps(schedule)
        if len(stochastic) == schedule.num_steps or not stochastic:
            return self.cost(schedule.num_steps, target)
        scored = 1 if target == "latent" else len(stochastic)
        pathwise = 0 if target == "latent" or self.ode == "frozen" else len(_pathwise_steps(schedule))
        calls = scored + pathwise
        return Cost(nfe_forward=schedule.num_steps / self.reuse + calls, nfe_vjp=calls, memory="A", activations=1)

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.baseline == "none" or rewards.numel() < 2:
            return rewards
        if self.baseline == "mean":
            return rewards - rewards.mean()
        if self.baseline == "group":  # Flow-GRPO: normalised within the group (here, the batch)
            return (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        return rewards - (rewards.sum() - rewards) / (rewards.numel() - 1)

    @torch.no_grad()
    def _sample(self, problem: Problem, rng: random.Random) -> dict:
        chain, schedule = problem.chain, problem.chain.schedule
        generator = torch_generator(rng) if self.fresh else None
        x, states = problem.x_start.detach(), []
        for i in range(schedule.num_steps, 0, -1):
            if generator is None:
                noise = noise_for(problem.noises, i)
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x_next = schedule.step(x, i, chain.eps(x, i, problem.cond), noise)
            states.append((i, x, x_next))
            x = x_next
        loss, rewards = problem.loss(x)
        return {
            "problem": weakref.ref(problem),
            "uses": 0,
            "states": states,
            "x0": x,
            "loss": float(loss),
            "rewards": rewards,
            "advantages": self._advantages(rewards.to(x.dtype)),
            "old_logp": {},
        }

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        batch = self._batch
        if batch is None or batch["problem"]() is not problem or batch["uses"] >= self.reuse:
            batch = self._batch = self._sample(problem, rng)
        batch["uses"] += 1
        chain, schedule = problem.chain, problem.chain.schedule
        advantages = batch["advantages"]
        latent_only = all(leaf is problem.x_start for leaf in problem.leaves)
        states = [state for state in batch["states"] if schedule.coefficients(state[0])[2] > 0]
        if latent_only:
            states = states[:1]  # only p(x_{N-1} | x_N) depends on x_N
        for i, x_i, x_prev in states:
            a, b, s = schedule.coefficients(i)
            x_in = problem.x_start if i == schedule.num_steps else x_i  # x_N is a leaf when optimised
            mean = a * x_in + b * chain.eps(x_in, i, problem.cond)
            squares = ((x_prev - mean) ** 2).flatten(1)
            logp = -(squares.mean(1) if self.logp == "mean" else squares.sum(1)) / (2 * s * s)
            if self.clip > 0:
                old = batch["old_logp"].setdefault(i, logp.detach())
                ratio = torch.exp(logp - old)
                surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - self.clip, 1 + self.clip) * advantages)
            else:
                surrogate = logp * advantages
            (-surrogate.mean()).backward()
        pathwise = _pathwise_steps(schedule) if self.ode == "exact" else ()
        if pathwise and not latent_only:
            self._pathwise_term(problem, batch, pathwise)
        if batch["uses"] >= self.reuse:
            self._batch = None  # do not hold the trajectories longer than needed
        return Estimate(loss=batch["loss"], rewards=batch["rewards"], x0=batch["x0"])

    @staticmethod
    def _pathwise_term(problem: Problem, batch: dict, pathwise: tuple[int, ...]) -> None:
        """grad of mean R(g(x_m)) through the deterministic final steps g, x_m as sampled."""
        chain, schedule = problem.chain, problem.chain.schedule
        last_stochastic = _stochastic_steps(schedule)[-1]
        x = next(x_next for i, _, x_next in batch["states"] if i == last_stochastic)
        for i in range(last_stochastic - 1, 0, -1):
            x = schedule.step(x, i, chain.eps(x, i, problem.cond) if i in pathwise else 0.0)
        loss, _ = problem.loss(x)
        if not loss.requires_grad:
            raise SkipCell(
                "the final steps inject no noise (s_i = 0), so the target reaches x_0 "
                "through them only by a pathwise term, which a non-differentiable reward "
                "does not have; use a schedule whose last step is stochastic"
            )
        loss.backward()


def _stochastic_steps(schedule) -> tuple[int, ...]:
    """Grid indices N..1 of the steps that inject noise (s_i > 0)."""
    return tuple(i for i in range(schedule.num_steps, 0, -1) if schedule.coefficients(i)[2] > 0)


def _pathwise_steps(schedule) -> tuple[int, ...]:
    """Grid indices (descending) of the deterministic final steps whose denoiser output enters
    x_0 (s_i = 0, b_i != 0, after the last stochastic step)."""
    stochastic = _stochastic_steps(schedule)
    if not stochastic:
        return ()
    return tuple(i for i in range(stochastic[-1] - 1, 0, -1) if schedule.coefficients(i)[1] != 0.0)
