"""The estimator contract. Subclass `Estimator`, declare `options`, implement `estimate`."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor

from bench.errors import SkipCell
from bench.options import Configurable, Option
from bench.problem import Problem, unreached_calls


@dataclass
class Estimate:
    """What one gradient call returns besides the `.grad` it fills (all detached)."""

    loss: float
    rewards: Tensor  # per-sample rewards of the sampler's x_0 at the current point
    x0: Tensor


@dataclass(frozen=True)
class Cost:
    """Predicted cost per gradient (docs/estimators/index.md, 'Cost model'): denoiser forwards, VJPs, and the
    memory class in the symbols A (one call's activations) and S (one latent). `activations` and
    `latents` are the class's coefficients (N·A + ... as numbers), so that the runner can predict
    bytes as activations·A + latents·S from A and S measured on the task; None: no prediction."""

    nfe_forward: float  # expected counts where the estimator draws at random
    nfe_vjp: float
    memory: str
    activations: float | None = None
    latents: float = 0.0
    # The coefficient of A alive while the reward's own graph is (the VAE decode, the reward
    # model) and its backward runs: None, all of `activations` (the graph is kept from the forward,
    # as in full or sdo); 0 for an estimator that takes the reward's gradient first and recomputes
    # its calls afterwards (checkpoint, the adjoints). The planner's peak (bench/planner/table.py)
    # is max(activations_at_reward·A + reward graph, activations·A) + latents·S.
    activations_at_reward: float | None = None
    # Forwards (among nfe_forward) run inside torch's non-reentrant checkpoint, first passes and
    # replays: each records a graph through pack/unpack hooks, H beyond a plain forward.
    checkpointed_forwards: float = 0.0
    # Calls without a graph that run while the graph of `activations` calls is alive (sdo's N - 1
    # calls after its kept one): the working memory W of one call (its transient buffers) adds to
    # the peak then.
    working: float = 0.0

    def predicted_seconds(self, f: float, v: float, h: float = 0.0) -> float:
        """The time model: forwards·F + VJPs·V + checkpointed forwards·H, from units measured on
        the task (bench/measure/timing.py)."""
        return self.nfe_forward * f + self.nfe_vjp * v + self.checkpointed_forwards * h

    def predicted_bytes(self, a_bytes: float | None, s_bytes: float | None) -> float | None:
        if self.activations is None or a_bytes is None or s_bytes is None:
            return None
        return self.activations * a_bytes + self.latents * s_bytes

    def predicted_peak_bytes(self, a: float, s: float, reward: float = 0.0, w: float = 0.0) -> float | None:
        """The peak of one gradient above what is resident (docs/estimators/index.md, 'Cost model'):
        latents·S + max(activations_at_reward·A + reward, activations·A + working·W), with `reward`
        the bytes the reward's graph keeps (0 where no reward gradient is taken) and W one call's
        working memory without a graph."""
        if self.activations is None:
            return None
        at_reward = self.activations if self.activations_at_reward is None else self.activations_at_reward
        return self.latents * s + max(at_reward * a + reward, self.activations * a + self.working * w)


class Estimator(Configurable):
    """Base class. One call of `estimate` returns the reward and fills `.grad` of `problem.leaves`;
    only that call is timed. An estimator that cannot serve a problem returns a reason from
    `skip_reason` instead of a silent zero gradient."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # True: the gradient equals the exact gradient of the chain (checked by the conformance suite
    # in every declared variant); an estimator exact in some options only makes it a property
    exact: ClassVar[bool] = False
    options: ClassVar[tuple[Option, ...]] = ()
    sampler: ClassVar[str] = ""  # "": the task's sampler is the chain differentiated; edict has its own
    # Option strings worth checking beside the defaults: `python -m bench check NAME` and make test
    # run the conformance suite on each, e.g. ("k=2,latent_path=true",).
    variants: ClassVar[tuple[str, ...]] = ()
    # p if the error to the exact gradient falls like N^-p (checked by the suite); None: no claim.
    convergence_order: ClassVar[float | None] = None
    samples_long_chain: ClassVar[bool] = True  # False if its gradient pass samples another chain than the task's
    random_counts: ClassVar[bool] = False  # True if call counts depend on random draws (reported, not checked)
    # False if no gradient of the reward is taken (a likelihood ratio, finite differences): the
    # planner keeps no graph of the VAE decode for it (bench/planner/table.py)
    reward_gradient: ClassVar[bool] = True
    # (colour, marker) in every figure, unique among the registered estimators; None: the figures
    # pick a pair no registered estimator has (bench/results/plots.py)
    plot_style: ClassVar[tuple[str, str] | None] = None
    # capabilities it provides, that some problems require (bench/capabilities.py), e.g. IN_ORDER:
    # every pass calls the denoiser only on the sampler's grid, N..1, never a step alone or off it
    provides: ClassVar[frozenset[str]] = frozenset()
    # what it needs of a problem beyond the chain: name -> what it is (problem.extras, task.offers())
    needs: ClassVar[dict[str, str]] = {}

    def code_objects(self) -> tuple:
        """What the estimator runs beyond its own class and the modules it imports, resolved by
        name at run time (a solver or another estimator chosen by an option): their code is in
        every cell's key."""
        return ()

    def unit_chain(self, problem: Problem):
        """The chain whose calls the memory class's A counts (a distilled student's for an
        estimator that differentiates one in place of the task's)."""
        return problem.chain

    def reference_spec(self) -> str:
        """An estimator whose gradient is the exact gradient of the chain this one differentiates
        (what its agreement is measured against)."""
        return "full"

    def sample(self, problem: Problem) -> Tensor:
        """x_0 of the sampler this estimator differentiates, without graph (for evaluation)."""
        return problem.chain.sample(problem.x_start, problem.cond, problem.noises)

    def check_steps(self, steps: int) -> None:
        """Raise SpecError if these options cannot run an N-step chain (e.g. k > N)."""

    def check_task(self, task) -> None:
        """Raise SpecError if these options cannot run on `task` at all (e.g. it lacks a model the
        estimator needs); cells that merely do not apply are skipped with skip_reason instead."""

    def skip_reason(self, problem: Problem) -> str | None:
        """Why this estimator gives no gradient to this problem's target, or None."""
        return None

    def problem_fields(self, problem: Problem) -> dict:
        """Row fields this estimator measures on the problem once it applies (shortcut-model: how
        far its student departs from the chain); none by default."""
        return {}

    def applies(self, problem: Problem) -> str | None:
        """Why this estimator cannot serve this problem, or None: what the runner asks
        (bench/capabilities.py decides: requirements, skip_reason, needs)."""
        from bench.capabilities import unmet

        return unmet(self, problem)

    def cost(self, steps: int, target: str) -> Cost:
        raise NotImplementedError

    def cost_for(self, problem: Problem) -> Cost:
        """The cost model for this problem (what rows and the conformance suite compare counts
        against). Override where the cost depends on the schedule, not only on N and the target."""
        return self.cost(problem.num_steps, problem.target)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        raise NotImplementedError

    def __call__(self, problem: Problem, rng: random.Random) -> Estimate:
        problem.zero_grad()
        return self.estimate(problem, rng)


def step_choice(*named: str) -> Callable[[str], str | None]:
    """An Option check for a step given by name (`named`) or by its 0-based index in sampling order."""

    def check(value: str) -> str | None:
        if value in named or re.fullmatch(r"[0-9]+", value):  # not isdigit(): it accepts '²'
            return None
        return f"must be {', '.join(named)} or a 0-based step index"

    return check


def reached_calls(steps: int, target: str) -> int:
    """Denoiser outputs a gradient to `target` can reach: all N, less the target's unreached
    leading calls (a task-owned target declares them, bench/problem.py Target)."""
    return steps - unreached_calls(target)


def require_graph(loss: Tensor) -> None:
    """A backprop estimator's loss must reach its leaves; a non-differentiable reward is a skip."""
    if not loss.requires_grad:
        raise SkipCell(
            "the reward is not differentiable (no graph from x_0 to the reward): "
            "backprop estimators get no gradient; use score-function or zeroth-order"
        )


def write_gradients(problem: Problem, latent: Tensor | None, others: Sequence[Tensor | None]) -> None:
    """Hand gradients an estimator computed itself (an adjoint, an inverse, finite differences) to
    the leaves, as loss.backward() would: `latent` into x_N where it is a leaf of this target,
    `others` into the other leaves in problem.leaves order (None: zero)."""
    rest = [leaf for leaf in problem.leaves if leaf is not problem.x_start]
    if len(others) != len(rest):
        raise ValueError(f"{len(others)} gradients for {len(rest)} leaves besides the latent")
    if problem.x_start.requires_grad:
        if latent is None:
            raise ValueError("the latent is a leaf of this target but got no gradient")
        problem.x_start.grad = latent.detach()
    for leaf, grad in zip(rest, others):
        leaf.grad = torch.zeros_like(leaf) if grad is None else grad.detach()


def backprop(problem: Problem, x0: Tensor) -> Estimate:
    """Loss at x_0, backward into the leaves, and the detached outcome."""
    loss, rewards = problem.loss(x0)
    require_graph(loss)
    loss.backward()
    return Estimate(loss=float(loss.detach()), rewards=rewards.detach(), x0=x0.detach())
