"""The estimators beyond the first five, against the exact gradient of the toy (float64)."""

import random

import pytest
import torch

from bench.errors import SkipCell
from bench.registry import ESTIMATORS, TASKS
from estimators.checkpoint import recursive_forwards
from estimators.randomness import torch_generator

from conftest import gradient, rel_err


@pytest.fixture(scope="module")
def noisy_toy():
    task = TASKS.create("toy[eta=1.0,batch=256]")
    task.setup(torch.device("cpu"))
    return task


@pytest.mark.parametrize("spec", ["checkpoint[segment=3]", "checkpoint[segment=7]", "checkpoint[recursive=true]"])
@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_checkpoint_variants_equal_full(spec, target, eta):
    task = TASKS.create(f"toy[eta={eta}]")
    task.setup(torch.device("cpu"))
    exact, _ = gradient(task, "full", target, 7)
    grad, problem = gradient(task, spec, target, 7)
    assert rel_err(grad, exact) < 1e-10
    cost = ESTIMATORS.create(spec).cost(7, target)
    assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (cost.nfe_forward, cost.nfe_vjp)


def test_recursive_checkpoint_forward_count_follows_its_recursion(toy):
    for steps in (1, 2, 3, 5, 8, 13, 16):
        _, problem = gradient(toy, "checkpoint[recursive=true]", "cond", steps)
        assert problem.chain.counter.forward == recursive_forwards(steps)
    assert recursive_forwards(16) == 56 and recursive_forwards(16) < 16 * (1 + 4)


def test_draft_lv_is_the_exact_gradient_of_its_own_objective(toy):
    steps, n = 6, 3
    grad, problem = gradient(toy, f"draft-lv[n={n}]", "cond", steps, rng_seed=5)
    # The same objective written out, with the same re-noising draws.
    problem.zero_grad()
    schedule, chain = problem.chain.schedule, problem.chain
    x0 = chain.sample(problem.x_start, problem.cond)
    generator = torch_generator(random.Random(5))
    loss = 0
    for _ in range(n):
        xi = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x1 = schedule.alpha(1) * x0 + schedule.sigma(1) * xi
        loss = loss + problem.loss(schedule.step(x1, 1, chain.eps(x1, 1, problem.cond)))[0] / n
    loss.backward()
    assert rel_err(grad, problem.flat_grad()) < 1e-12


def _mean_estimate(task, spec, target, steps, calls, seed=0):
    problem = task.make_problem(target, steps, seed)
    estimator, rng = ESTIMATORS.create(spec), random.Random(123)
    draws = []
    for _ in range(calls):
        estimator(problem, rng)
        draws.append(problem.flat_grad().detach().clone())
    draws = torch.stack(draws)
    return draws.mean(0), draws.std(0) / calls**0.5, problem


def test_zeroth_order_is_unbiased_for_the_smoothed_objective():
    """mu small: the smoothed gradient equals the exact one to O(mu^2); the mean of many
    estimates approaches it, within a tolerance that a sign or a factor-2 error would exceed.
    (A 3-dimensional conditioning keeps the 2000 directions' statistical error near 4 %.)"""
    toy = TASKS.create("toy[d=1,modes=2]")
    toy.setup(torch.device("cpu"))
    exact, _ = gradient(toy, "full", "cond", 3)
    mean, stderr, _ = _mean_estimate(toy, "zeroth-order[n=100,mu=0.001]", "cond", 3, calls=20)
    assert rel_err(mean, exact) < 0.15
    assert ((mean - exact).abs() <= 5 * stderr + 1e-3 * exact.abs().max()).all()
    assert rel_err(-mean, exact) > 1.5 and rel_err(2 * mean, exact) > 0.5


def test_score_function_is_unbiased(noisy_toy):
    """With fresh noise, E[score-function] = grad E_xi[R] = E_xi[pathwise gradient]; both means
    over many draws agree (the pathwise one by resampling the injected noise)."""
    steps, target = 4, "cond"
    problem = noisy_toy.make_problem(target, steps, 0)
    generator = torch.Generator().manual_seed(7)
    pathwise = []
    for _ in range(200):
        problem.noises = [
            torch.randn(problem.x_start.shape, generator=generator, dtype=torch.float64) for _ in range(steps)
        ]
        ESTIMATORS.create("full")(problem, random.Random(0))
        pathwise.append(problem.flat_grad().clone())
    pathwise = torch.stack(pathwise)
    reference, reference_err = pathwise.mean(0), pathwise.std(0) / len(pathwise) ** 0.5
    mean, stderr, _ = _mean_estimate(noisy_toy, "score-function", target, steps, calls=300)
    assert rel_err(mean, reference) < 0.2
    assert ((mean - reference).abs() <= 5 * (stderr**2 + reference_err**2).sqrt()).all()
    assert rel_err(-mean, reference) > 1.5 and rel_err(2 * mean, reference) > 0.5


def test_score_function_reuses_its_samples_under_ppo(noisy_toy):
    problem = noisy_toy.make_problem("weights", 4, 0)
    estimator, rng = ESTIMATORS.create("score-function[clip=0.2,reuse=2]"), random.Random(0)
    estimator(problem, rng)
    first = problem.flat_grad().clone()
    problem.chain.counter.reset()
    estimator(problem, rng)  # the same trajectories, unchanged weights: ratio 1, same gradient
    assert problem.chain.counter.forward == 4  # the recomputed means only; nothing sampled
    assert rel_err(problem.flat_grad(), first) < 1e-12
    problem.chain.counter.reset()
    estimator(problem, rng)  # a fresh batch
    assert problem.chain.counter.forward == 8


def test_score_function_needs_a_stochastic_sampler(toy):
    problem = toy.make_problem("cond", 4, 0)
    assert "eta > 0" in ESTIMATORS.create("score-function").skip_reason(problem)


def test_a_non_differentiable_reward_is_optimised_by_the_score_function():
    """'inside' is an indicator: backprop has no graph to follow (a skip, not a silent zero);
    the score function still climbs."""
    task = TASKS.create("toy[eta=1.0,batch=256,reward=inside]")
    task.setup(torch.device("cpu"))
    with pytest.raises(SkipCell, match="not differentiable"):
        gradient(task, "full", "cond", 4)
    problem = task.make_problem("cond", 4, 0)
    estimator, rng = ESTIMATORS.create("score-function"), random.Random(0)
    optimiser = torch.optim.Adam(problem.leaves, lr=0.1)
    rewards = []
    for _ in range(25):
        rewards.append(float(estimator(problem, rng).rewards.mean()))
        optimiser.step()
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05, rewards


@pytest.mark.parametrize("spec", ["draft-lv", "zeroth-order", "score-function"])
def test_new_estimators_follow_the_rng(spec, noisy_toy):
    a, _ = gradient(noisy_toy, spec, "cond", 4, rng_seed=1)
    b, _ = gradient(noisy_toy, spec, "cond", 4, rng_seed=1)
    c, _ = gradient(noisy_toy, spec, "cond", 4, rng_seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("target", ["latent", "noise"])
def test_dno_without_regulariser_is_the_exact_gradient(noisy_toy, target):
    exact, _ = gradient(noisy_toy, "full", target, 5)
    grad, problem = gradient(noisy_toy, "dno", target, 5)
    assert rel_err(grad, exact) < 1e-10
    assert len(problem.leaves) == (6 if target == "noise" else 1)  # x_N and the 5 injected noises


def test_dno_regulariser_pulls_noise_towards_a_gaussian():
    """The regulariser is minimal for Gaussian-looking noise and grows for a shifted or inflated
    one; its gradient alone moves a shifted noise back."""
    from estimators.dno import probability_regulariser

    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(4, 4096, generator=generator, dtype=torch.float64)
    values = {
        name: float(probability_regulariser(z, 4, 8, torch.Generator().manual_seed(1)))
        for name, z in (("gaussian", gaussian), ("shifted", gaussian + 0.3), ("inflated", 2 * gaussian))
    }
    assert values["gaussian"] < values["shifted"] and values["gaussian"] < values["inflated"]
    shifted = (gaussian + 0.3).requires_grad_(True)
    probability_regulariser(shifted, 4, 8, torch.Generator().manual_seed(1)).backward()
    assert float(shifted.grad.mean()) > 0  # descent lowers the mean back towards zero


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_edict_is_the_exact_gradient_of_its_own_chain(toy, target):
    own, _ = gradient(toy, "edict[reconstruct=false]", target, 6)
    grad, problem = gradient(toy, "edict", target, 6)
    assert rel_err(grad, own) < 1e-6
    cost = ESTIMATORS.create("edict").cost(6, target)
    assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (cost.nfe_forward, cost.nfe_vjp)
    ddim, _ = gradient(toy, "full", target, 6)
    assert rel_err(grad, ddim) > 1e-3  # another sampler, another gradient: rows must say so


def test_edict_samples_its_own_chain_and_inverts_it(toy):
    problem = toy.make_problem("latent", 8, 0)
    edict = ESTIMATORS.create("edict")
    x, y = edict.run(problem, problem.x_start.detach())
    for i in range(1, 9):
        x, y = edict.invert(problem, i, x, y)
    assert torch.allclose(x, problem.x_start, atol=1e-9) and torch.allclose(y, problem.x_start, atol=1e-9)
    assert edict.sampler == "edict" and edict.reference_spec() == "edict[p=0.93,reconstruct=false]"


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_torchdiffeq_adjoint_is_the_cached_state_adjoint(toy, target):
    """torchdiffeq resets y to the forward solution at every output time: with the sampler's grid
    as output times it equals adjoint[recover=cache] (N = 10 divides 1000: DDIM is exactly Euler)."""
    ours, _ = gradient(toy, "adjoint[recover=cache]", target, 10)
    theirs, problem = gradient(toy, "torchdiffeq-adjoint", target, 10)
    assert rel_err(theirs, ours) < 1e-10
    recovered, _ = gradient(toy, "adjoint", target, 10)
    assert rel_err(theirs, recovered) > 1e-3
    assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (20, 10)
