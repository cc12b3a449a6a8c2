"""The checkpoint estimator's forward count is modelled exactly (its cost model against the
counter), and its gradient equals full's."""

import random

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from bench.chain import Chain, Schedule
from bench.problem import Problem
from bench.registry import ESTIMATORS


class _TanhPlusBias(nn.Module):
    """eps = tanh(x) + b: the first step, with x_N a constant, saves nothing for backward."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.full((3,), 0.1, dtype=torch.float64))

    def forward(self, x, t, cond):
        return torch.tanh(x) + self.b


@pytest.mark.parametrize("target,forwards", [("weights", 7), ("latent", 8)])
def test_checkpoint_forward_count_is_modelled_exactly(target, forwards):
    denoiser = _TanhPlusBias()
    schedule = Schedule.from_scheduler(DDIMScheduler(timestep_spacing="trailing", clip_sample=False), 4)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=target == "latent")
    problem = Problem(
        Chain(denoiser, schedule),
        x,
        None,
        None,
        lambda x0: -(x0**2).sum(-1),
        target,
        [denoiser.b] if target == "weights" else [x],
    )
    estimator = ESTIMATORS.create("checkpoint")
    estimator(problem, random.Random(0))
    cost = estimator.cost_for(problem)
    assert problem.chain.counter.forward == forwards == cost.nfe_forward
    full = Problem(Chain(denoiser, schedule), x, None, None, problem.reward_fn, target, problem.leaves)
    exact = [leaf.grad.clone() for leaf in problem.leaves]
    ESTIMATORS.create("full")(full, random.Random(0))
    for leaf, grad in zip(full.leaves, exact):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-12, atol=1e-12)
