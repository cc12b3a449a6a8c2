"""checkpoint: backprop through the whole chain, recomputing the graph during backward
(torch.utils.checkpoint, non-reentrant; docs/estimators/index.md). The same gradient as `full` to
float rounding.

- segment = s (default 1): checkpoint runs of s steps; only each run's input latent is stored.
  Memory s*A + (N/s)*S, time 2NF + NV + 2NH. H is what running inside torch's non-reentrant
  checkpoint adds to a forward: its first pass records autograd's graph through pack/unpack hooks
  (which drop the tensors), its replay runs inside the same machinery. Measured on digits
  weights (batch 8, one thread): F = 22.4 ms, V = 27.7 ms, a recorded forward 3.2 ms above F, a
  checkpointed forward 3.0 ms above that, and the checkpointed forward + VJP 8.4 ms above the
  model without H (2F + V + R): H = 6.5-7 ms, 0.3 F. Without H the model was 14-38 % under the
  measured time at N = 10-100; with it, within the suite's 10 % (docs/methodology.md, "Timing").
- recursive = true: binomial (divide-and-conquer) checkpointing. The chain is split in halves,
  each half checkpointed, recursively down to single steps, so at most one stored latent per
  level is live: memory A + O(log2 N)*S, at the price of about N*log2(N)/2 extra forwards.
  With torch's early-stopping recomputation, replaying a region only runs its first half (the
  second half's input is all it must save), so a region of m = a + b steps costs
  D(m) = a + D(a) + D(b) forwards in backward, D(1) = 1, and a gradient N + D(first) + D(second).
  Every one of them runs inside a checkpoint: time (forwards)(F + H) + NV. Measured at N = 100
  on digits weights: 1.09-1.13 times that model (about 3 ms per forward more); nesting depth is
  not the cause (one step inside 1..7 nested checkpoints costs the same), the counts are exact;
  the cause is open.
"""

from __future__ import annotations

import math
from dataclasses import replace
import random

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from bench.capabilities import IN_ORDER
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop, reached_calls
from estimators.masked_chain import run_masked_chain


def run_steps(problem: Problem, high: int, low: int, *state: Tensor) -> tuple[Tensor, ...]:
    """The state at grid point low from the state at high (a state is (x, *history)): the
    sampler's steps i = high, ..., low + 1 with their graph."""
    for i in range(high, low, -1):
        state = problem.chain.advance(state, i, problem.cond, problem.noises)
    return state


def run_recursive(problem: Problem, high: int, low: int, *state: Tensor) -> tuple[Tensor, ...]:
    if high - low <= 1:
        return run_steps(problem, high, low, *state)
    middle = (high + low + 1) // 2
    state = recompute_in_backward(run_recursive, problem, high, middle, *state, use_reentrant=False)
    return recompute_in_backward(run_recursive, problem, middle, low, *state, use_reentrant=False)


def recursion_depth(steps: int) -> int:
    return math.ceil(math.log2(steps)) if steps > 1 else 0


def _halves(steps: int) -> tuple[int, int]:
    """Step counts of run_recursive's first and second half of a region of `steps` steps."""
    first = steps - (steps + 1) // 2
    return first, steps - first


def recursive_forwards(steps: int) -> int:
    """Denoiser forwards of one recursive-checkpoint gradient (see the module docstring)."""

    def backward_forwards(m: int) -> int:
        if m == 1:
            return 1
        a, b = _halves(m)
        return a + backward_forwards(a) + backward_forwards(b)

    if steps == 1:
        return 1
    a, b = _halves(steps)
    return steps + backward_forwards(a) + backward_forwards(b)


class Checkpoint(Estimator):
    name = "checkpoint"
    plot_style = ("#8c8c8c", "s")  # colour and marker in every figure
    summary = "exact backprop, graph recomputed in backward (per step, in segments, or recursively)"
    exact = True
    provides = frozenset({IN_ORDER})
    options = (
        Option("segment", int, 1, "steps per checkpointed segment", check=at_least(1)),
        Option("recursive", bool, False, "binomial checkpointing: O(log N) stored latents"),
    )
    variants = ("segment=3", "recursive=true")

    def __init__(self, **values):
        super().__init__(**values)
        if self.recursive and self.segment != 1:
            raise SpecError("checkpoint: recursive=true and segment > 1 are exclusive; choose one")

    def check_steps(self, steps: int) -> None:
        if self.segment > steps:
            raise SpecError(f"{self.spec}: segment={self.segment} exceeds the step count N={steps}")

    def cost(self, steps: int, target: str) -> Cost:
        if self.recursive:
            depth = recursion_depth(steps)
            return Cost(
                nfe_forward=recursive_forwards(steps),
                nfe_vjp=reached_calls(steps, target),
                memory="A + log2(N)·S",
                checkpointed_forwards=recursive_forwards(steps),
                activations=1,
                latents=depth,
                activations_at_reward=0,
            )
        segments = math.ceil(steps / self.segment)
        return Cost(
            nfe_forward=2 * steps,
            nfe_vjp=reached_calls(steps, target),
            checkpointed_forwards=2 * steps,
            memory="A + N·S" if self.segment == 1 else "s·A + (N/s)·S",
            activations=self.segment,
            latents=segments,
            activations_at_reward=0,
        )

    def cost_for(self, problem: Problem) -> Cost:
        """torch recomputes a checkpointed region in backward only if it saved a tensor for
        backward. With one step per region, the first step's input x_N is a constant for the cond
        and weights targets, and a denoiser whose parameters enter without saving anything there
        (e.g. an additive bias) is never recomputed: N + (N - 1) forwards. Probed with one untimed,
        uncounted denoiser call."""
        cost = self.cost(problem.num_steps, problem.target)
        if self.recursive or self.segment != 1 or problem.num_steps < 1 or first_step_saves(problem):
            return cost
        return replace(cost, nfe_forward=cost.nfe_forward - 1, checkpointed_forwards=cost.checkpointed_forwards - 1)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        steps = problem.num_steps
        start = problem.chain.schedule.start(problem.x_start)
        if self.recursive:
            x0 = run_recursive(problem, steps, 0, *start)[0]
        elif self.segment == 1:
            x0 = run_masked_chain(problem, keep_graph=lambda i: True, keep_latent_path=True, checkpoint=True)
        else:
            state = start
            for high in range(steps, 0, -self.segment):
                low = max(high - self.segment, 0)
                state = recompute_in_backward(run_steps, problem, high, low, *state, use_reentrant=False)
            x0 = state[0]
        return backprop(problem, x0)


def first_step_saves(problem: Problem) -> bool:
    """Does the first denoiser call save any tensor for backward (so that a checkpoint around it
    is replayed)? One call outside the counter."""
    saved = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal saved
        saved += 1
        return tensor

    chain, steps = problem.chain, problem.num_steps
    counted = chain.counter.forward, chain.counter.vjp
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            eps = chain.eps(problem.x_start, steps, problem.cond)
    finally:
        chain.counter.forward, chain.counter.vjp = counted
    return saved > 0 and eps.requires_grad
