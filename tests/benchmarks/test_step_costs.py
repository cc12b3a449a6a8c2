"""Micro-benchmarks of one sampler step on the digits U-Net (batch 8, float32): the units F and V
of the cost model (docs/estimators/index.md), so per-step costs can be compared across commits.

Not part of `make test`: run `make bench` (pytest-benchmark; add --benchmark-autosave and
--benchmark-compare to compare with an earlier run)."""

import random

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bench.registry import TASKS
from estimators.adjoint import drift_and_vjp

pytestmark = pytest.mark.benchmark


@pytest.fixture(scope="module")
def problem():
    task = TASKS.create("digits")
    task.setup(torch.device("cpu"))
    return task.make_problem("weights", 10, seed=0)


def _step(problem, x):
    return problem.chain.schedule.step(x, 10, problem.chain.eps(x, 10, problem.cond))


def test_step_without_graph(benchmark, problem):
    """F: one denoiser call and DDIM update, no graph (what sampling costs per step)."""
    with torch.no_grad():
        benchmark(_step, problem, problem.x_start)


def test_step_with_graph_and_backward(benchmark, problem):
    """F + V: the step with its graph kept, then its VJP (what full backprop costs per step)."""
    seed = torch.ones_like(problem.x_start)

    def run():
        out = _step(problem, problem.x_start)
        out.backward(seed)
        problem.zero_grad()

    benchmark(run)


def test_checkpointed_step_and_backward(benchmark, problem):
    """2F + V: the same step under torch.utils.checkpoint (recomputed during backward)."""
    seed = torch.ones_like(problem.x_start)
    x = problem.x_start.detach().requires_grad_(True)

    def run():
        out = checkpoint(lambda x_i: _step(problem, x_i), x, use_reentrant=False)
        out.backward(seed)
        problem.zero_grad()

    benchmark(run)


def test_adjoint_step(benchmark, problem):
    """F + V: one step of the augmented adjoint ODE (drift and its VJPs to y and the weights)."""
    schedule = problem.chain.schedule
    y = problem.x_start.detach() / schedule.alpha(10)
    a_y = torch.ones_like(y)
    params = [leaf for leaf in problem.leaves]
    benchmark(drift_and_vjp, problem.chain, y, schedule.rho(10), schedule.model_time(10), problem.cond, a_y, params)


def test_full_gradient_at_n10(benchmark, problem):
    """For scale: one exact gradient through 10 steps (about 10 F + 10 V)."""
    from bench.registry import ESTIMATORS

    full = ESTIMATORS.create("full")
    benchmark.pedantic(full, args=(problem, random.Random(0)), rounds=5, warmup_rounds=1)


def test_step_recording_a_graph_it_drops(benchmark, problem):
    """F + R: the forward with autograd recording, its graph dropped (what a forward costs once
    torch records: the part of H that is not the checkpoint's own hooks)."""
    x = problem.x_start.detach().requires_grad_(True)
    benchmark(_step, problem, x)


def test_checkpointed_step_forward_only(benchmark, problem):
    """F + H: the first pass of a checkpointed step (pack hooks drop what it saves)."""
    x = problem.x_start.detach().requires_grad_(True)
    benchmark(lambda: checkpoint(lambda x_i: _step(problem, x_i), x, use_reentrant=False))
