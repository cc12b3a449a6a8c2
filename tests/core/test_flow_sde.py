"""The flow-sde sampler (Flow-GRPO's marginal-preserving SDE) and the policy gradient on it: the
marginals of the exact model's SDE against the data's, eta = 0 against flow-matching Euler, the
per-step log-probabilities against torch.distributions.Normal, the on-policy ratio 1, the
log-probability as a mean or a sum."""

import random

import pytest
import torch

from bench.chain import Chain
from bench.registry import ESTIMATORS, TASKS
from conftest import cosine, rel_err


def toy(spec):
    task = TASKS.create(spec)
    task.setup(torch.device("cpu"))
    return task


@pytest.fixture(scope="module")
def toy_sde():
    return toy("toy[sampler=flow-sde,eta=0.7,batch=6]")


def test_eta_zero_is_flow_matching_euler():
    ode = toy("toy[sampler=flow-euler]").make_problem("latent", 12, 0)
    sde = toy("toy[sampler=flow-sde]").make_problem("latent", 12, 0)
    for i in range(1, 13):
        assert sde.chain.schedule.coefficients(i) == pytest.approx(ode.chain.schedule.coefficients(i), abs=0)
    assert torch.equal(sde.chain.sample(sde.x_start, sde.cond), ode.chain.sample(ode.x_start, ode.cond))


def test_the_sde_keeps_the_marginals_of_the_data():
    """One Gaussian component, the exact velocity: x_0 of the SDE is distributed as the data,
    N(mu, s^2 I), within Monte Carlo and discretisation error (4000 samples, 200 steps), as the
    ODE's is; a wrong drift correction (a = 1) moves the variance far off."""
    task = toy("toy[modes=1,std=0.5,sampler=flow-sde,eta=0.7,batch=4000]")
    problem = task.make_problem("latent", 200, 0)
    generator = torch.Generator().manual_seed(1)
    noises = [torch.randn(4000, 2, generator=generator, dtype=torch.float64) for _ in range(200)]
    x0 = problem.chain.sample(problem.x_start, problem.cond, noises)
    mean, var = x0.mean(0), x0.var(0)
    assert torch.allclose(mean, task.means[0], atol=0.05)
    assert torch.allclose(var, torch.full((2,), 0.25, dtype=torch.float64), atol=0.03)
    schedule = problem.chain.schedule
    x = problem.x_start.detach()
    for i in range(200, 0, -1):  # the same noise without the drift's correction term
        _, b, s = schedule.coefficients(i)
        x = x + b * problem.chain.eps(x, i, problem.cond) + s * noises[i - 1]
    assert float((x.var(0) - 0.25).abs().max()) > 0.1


def _independent_policy_gradient(task, target, steps, normalise):
    """sum_i grad Normal(mu_i(theta), s_i).log_prob(x_{i-1}) . A over the problem's own noise
    trajectory, with A = (R - mean) / std when normalise, else R - mean."""
    problem = task.make_problem(target, steps, 0)
    chain, schedule = problem.chain, problem.chain.schedule
    with torch.no_grad():
        x0, states = chain.sample(problem.x_start, problem.cond, problem.noises, keep_states=True)
        rewards = problem.reward_fn(x0)
    advantages = rewards - rewards.mean()
    if normalise:
        advantages = advantages / (rewards.std() + 1e-8)
    total = 0
    for i in range(steps, 0, -1):
        a, b, s = schedule.coefficients(i)
        if s == 0:  # outside an SDE window: no density, not scored
            continue
        x_i = problem.x_start if i == steps else states[steps - i]
        mean = a * x_i + b * chain.eps(x_i, i, problem.cond)
        logp = torch.distributions.Normal(mean, s).log_prob(states[steps - i + 1]).sum(-1)
        total = total - (logp * advantages).mean()
    grads = torch.autograd.grad(total, problem.leaves)
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
@pytest.mark.parametrize("baseline", ["mean", "group"])
def test_the_policy_gradient_on_the_sde_uses_its_gaussian_steps(toy_sde, target, baseline):
    problem = toy_sde.make_problem(target, 8, 0)
    ESTIMATORS.create(f"score-function[baseline={baseline},fresh=false]")(problem, random.Random(0))
    expected = _independent_policy_gradient(toy_sde, target, 8, baseline == "group")
    assert float(expected.norm()) > 0
    assert rel_err(problem.flat_grad(), expected) < 1e-10


WINDOW = "toy[sampler=flow-sde[start=1,window=2],eta=0.7,batch=6]"


def test_the_sde_window_injects_noise_on_its_steps_only():
    """Steps 1 and 2 in sampling order (grid indices N - 1, N - 2) are the SDE's, bit for bit; the
    others are flow-matching Euler's."""
    steps = 6
    window, sde, ode = (
        toy(spec).make_problem("latent", steps, 0).chain.schedule
        for spec in (WINDOW, "toy[sampler=flow-sde,eta=0.7]", "toy[sampler=flow-euler]")
    )
    assert [i for i in range(steps, 0, -1) if window.noise_std(i) > 0] == [steps - 1, steps - 2]
    for i in range(1, steps + 1):
        same = sde if i in (steps - 1, steps - 2) else ode
        assert window.coefficients(i) == same.coefficients(i), i


@pytest.mark.parametrize("target", ["cond", "weights"])
def test_frozen_ode_steps_leave_the_score_of_the_window_alone(target):
    """MixGRPO / Flow-GRPO-Fast: with ode=frozen the gradient is the window's Gaussian steps'
    score term alone, computed independently; the exact reading refuses the deterministic first
    step; on a chain that is all SDE the two readings are one."""
    task = toy(WINDOW)
    problem = task.make_problem(target, 6, 0)
    exact = ESTIMATORS.create("score-function[baseline=group,fresh=false]")
    assert "ode=frozen" in exact.skip_reason(problem)
    ESTIMATORS.create("score-function[baseline=group,fresh=false,ode=frozen]")(problem, random.Random(0))
    expected = _independent_policy_gradient(task, target, 6, True)
    assert float(expected.norm()) > 0
    assert rel_err(problem.flat_grad(), expected) < 1e-10
    everywhere = toy("toy[sampler=flow-sde,eta=0.7,batch=6]")
    frozen, plain = (everywhere.make_problem(target, 6, 0) for _ in range(2))
    ESTIMATORS.create("score-function[fresh=false,ode=frozen]")(frozen, random.Random(0))
    ESTIMATORS.create("score-function[fresh=false]")(plain, random.Random(0))
    assert torch.equal(frozen.flat_grad(), plain.flat_grad())


def test_on_policy_ratio_is_one_and_mean_logp_is_the_same_direction(toy_sde):
    """PPO's clipped surrogate on freshly sampled trajectories has ratio exactly 1, so its gradient
    is REINFORCE's; the per-dimension mean log-probability gives the same direction, 1/D the length."""
    plain, clipped, mean = (toy_sde.make_problem("weights", 8, 0) for _ in range(3))
    ESTIMATORS.create("score-function[baseline=group,fresh=false]")(plain, random.Random(0))
    ESTIMATORS.create("score-function[baseline=group,fresh=false,clip=0.2]")(clipped, random.Random(0))
    ESTIMATORS.create("score-function[baseline=group,fresh=false,logp=mean]")(mean, random.Random(0))
    assert rel_err(clipped.flat_grad(), plain.flat_grad()) < 1e-12
    assert cosine(mean.flat_grad(), plain.flat_grad()) > 1 - 1e-12
    assert float(mean.flat_grad().norm()) == pytest.approx(float(plain.flat_grad().norm()) / toy_sde.d, rel=1e-10)


def test_the_sde_serves_the_digits_flow_models():
    task = TASKS.create("digits[model=flow,sampler=flow-sde,eta=0.7,batch=2]")
    task.setup(torch.device("cpu"))
    problem = task.make_problem("weights", 3, 0)
    assert problem.chain.schedule.sampler == "flow-sde" and len(problem.noises) == 3
    ESTIMATORS.create("score-function[baseline=group,logp=mean,clip=0.2]")(problem, random.Random(0))
    assert torch.isfinite(problem.flat_grad()).all() and float(problem.flat_grad().norm()) > 0
    assert isinstance(problem.chain, Chain)


@pytest.mark.parametrize("spec", ["toy[sampler=flow-sde,eta=0.7,batch=6]", "toy[eta=0.6,batch=6]"])
@pytest.mark.parametrize("target", ["cond", "weights"])
def test_adjoint_matching_at_the_base_model_is_the_pathwise_reward_gradient(spec, target):
    """At the base model the regression's gradient is sum_i b_i (d out_i / d theta)^T a_{i-1} with
    the lean adjoint a: the chain's gradient with the noise held fixed, what full computes; once
    the parameters have moved, the regression term pulls it elsewhere."""
    task = toy(spec)
    problem = task.make_problem(target, 8, 0)
    ESTIMATORS.create("adjoint-matching")(problem, random.Random(0))
    ours = problem.flat_grad().clone()
    reference = task.make_problem(target, 8, 0)
    ESTIMATORS.create("full")(reference, random.Random(0))
    assert float(reference.flat_grad().norm()) > 0
    assert rel_err(ours, reference.flat_grad()) < 1e-10
    tilted = task.make_problem(target, 8, 0)
    ESTIMATORS.create("adjoint-matching[tilt=3]")(tilted, random.Random(0))
    assert rel_err(tilted.flat_grad(), 3 * reference.flat_grad()) < 1e-10
    with torch.no_grad():
        for leaf in problem.leaves:
            leaf.add_(0.3 * torch.ones_like(leaf))
    ESTIMATORS.create("adjoint-matching")(problem, random.Random(0))
    moved = problem.flat_grad().clone()
    ESTIMATORS.create("full")(problem, random.Random(0))
    assert rel_err(moved, problem.flat_grad()) > 1e-3


def test_adjoint_matching_needs_the_injected_noise():
    problem = toy("toy").make_problem("weights", 8, 0)
    assert "eta = 0" in ESTIMATORS.create("adjoint-matching").skip_reason(problem)
