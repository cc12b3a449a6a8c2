"""Every built-in estimator against the exact gradient of the discrete chain on `toy` (float64)."""

import random

import pytest
import torch

from bench.registry import ESTIMATORS, TASKS
from conftest import cosine, gradient, rel_err

TARGETS = ["latent", "cond", "weights"]


def loss_of_leaf(problem, leaf_index, value):
    """L as a function of one leaf (used by the finite-difference check)."""
    leaf = problem.leaves[leaf_index]
    with torch.no_grad():
        saved = leaf.detach().clone()
        leaf.copy_(value)
        x0 = problem.chain.sample(problem.x_start, problem.cond, problem.noises)
        loss = float(problem.loss(x0)[0])
        leaf.copy_(saved)
    return loss


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("task_name", ["toy", "toy_eta"])
def test_full_matches_finite_differences(request, target, task_name):
    task = request.getfixturevalue(task_name)
    grad, problem = gradient(task, "full", target, steps=6)
    generator = torch.Generator().manual_seed(1)
    offset = 0
    for index, leaf in enumerate(problem.leaves):
        direction = torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype)
        h = 1e-6
        numeric = (
            loss_of_leaf(problem, index, leaf + h * direction) - loss_of_leaf(problem, index, leaf - h * direction)
        ) / (2 * h)
        analytic = float(grad[offset : offset + leaf.numel()] @ direction.reshape(-1))
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
        offset += leaf.numel()


def test_toy_denoiser_is_the_exact_noise_prediction(toy):
    """eps = -sigma * grad log p_t for the noised mixture, written independently with torch.distributions."""
    problem = toy.make_problem("latent", 10, 0)
    denoiser, schedule = problem.chain.denoiser, problem.chain.schedule
    x = torch.randn(6, toy.d, dtype=torch.float64, requires_grad=True)
    for i in (10, 5, 1):
        ab = schedule.alpha_bar[i]
        alpha, sigma = ab**0.5, (1 - ab) ** 0.5
        mix = torch.distributions.Categorical(logits=denoiser.logits.detach())
        comp = torch.distributions.Independent(
            torch.distributions.Normal(alpha * denoiser.means.detach(), (alpha**2 * toy.std**2 + sigma**2) ** 0.5), 1
        )
        log_p = torch.distributions.MixtureSameFamily(mix, comp).log_prob(x).sum()
        (score,) = torch.autograd.grad(log_p, x)
        t = torch.full((6,), schedule.model_time(i), dtype=torch.float64)
        torch.testing.assert_close(denoiser(x, t, None), -sigma * score, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("task_name", ["toy", "toy_eta"])
def test_checkpoint_equals_full(request, target, task_name):
    task = request.getfixturevalue(task_name)
    exact, _ = gradient(task, "full", target, steps=20)
    grad, _ = gradient(task, "checkpoint", target, steps=20)
    assert float(exact.norm()) > 0
    assert rel_err(grad, exact) < 1e-10


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("recover", ["backward", "cache"])
@pytest.mark.parametrize("seed", [0, 1])
def test_adjoint_converges_to_the_discrete_gradient(toy, target, recover, seed):
    errors = {}
    for steps in (10, 100):
        exact, _ = gradient(toy, "full", target, steps, seed=seed)
        grad, _ = gradient(toy, f"adjoint[recover={recover}]", target, steps, seed=seed)
        errors[steps] = rel_err(grad, exact)
    assert errors[100] < 0.1  # close, not exact: the continuous adjoint is O(h) off (latent: 7 %)
    assert errors[100] > 1e-6
    assert errors[10] / errors[100] >= 4.0, errors


@pytest.mark.parametrize("target", TARGETS)
def test_adjoint_is_first_order(toy, target):
    """Halving h halves the error (Euler's VJP at the clean end vs the discrete one at the noisy end)."""
    errors = []
    for steps in (100, 200):
        exact, _ = gradient(toy, "full", target, steps)
        grad, _ = gradient(toy, "adjoint[recover=cache]", target, steps)
        errors.append(rel_err(grad, exact))
    assert 1.6 < errors[0] / errors[1] < 2.6, errors


def test_adjoint_cache_and_backward_agree_closely(toy):
    """Backward recovery only adds re-integration drift; on a fine grid both modes nearly agree."""
    cached, _ = gradient(toy, "adjoint[recover=cache]", "cond", 200)
    recovered, _ = gradient(toy, "adjoint", "cond", 200)
    assert rel_err(recovered, cached) < 0.02


def _sdo_closed_form(task, target, steps, k, seed=0):
    """docs/estimators/index.md: dx0/dxN ~ (a0/aN)[I + beta_k a_k J_x(eps_k)] (J term only if k = N);
    dx0/dtheta ~ a0 beta_k d eps_k/d theta; each contracted with g = dL/dx0 at the true sample."""
    problem = task.make_problem(target, steps, seed)
    chain, schedule = problem.chain, problem.chain.schedule
    x0, states = chain.sample(problem.x_start, problem.cond, problem.noises, keep_states=True)
    x0 = x0.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.loss(x0)[0], x0)
    x_k = states[steps - k]
    a0, aN, beta = schedule.alpha(0), schedule.alpha(steps), schedule.eps_weight(k)
    if target == "latent":
        expected = (a0 / aN) * g
        if k == steps:
            x_var = x_k.detach().requires_grad_(True)
            (jvp,) = torch.autograd.grad(chain.eps(x_var, k, problem.cond), x_var, g)
            expected = expected + a0 * beta * jvp  # (a0/aN) * beta * a_N * J^T g
        return expected.reshape(-1)
    eps = chain.eps(x_k, k, problem.cond)
    grads = torch.autograd.grad(eps, problem.leaves, g)
    return torch.cat([a0 * beta * gr.reshape(-1) for gr in grads])


@pytest.mark.parametrize("target", TARGETS)
# N = 10 divides T = 1000: every trailing step lands on the next grid point, where the closed form
# (alpha_0 / alpha_N, alpha_0 beta_k) is the chain's; elsewhere the weights are the step rule's own
# (tests/core/test_samplers.py)
@pytest.mark.parametrize("step,k", [("first", 10), ("last", 1), ("4", 6)])
@pytest.mark.parametrize("task_name", ["toy", "toy_eta"])
def test_sdo_matches_its_closed_form(request, target, step, k, task_name):
    task = request.getfixturevalue(task_name)
    grad, _ = gradient(task, f"sdo[step={step}]", target, steps=10)
    expected = _sdo_closed_form(task, target, 10, k)
    assert float(expected.norm()) > 0
    assert rel_err(grad, expected) < 1e-12


@pytest.mark.parametrize("target", TARGETS)
def test_sdo_is_biased_but_reported(toy, target):
    exact, _ = gradient(toy, "full", target, 20)
    grad, _ = gradient(toy, "sdo", target, 20)
    assert rel_err(grad, exact) > 1e-3  # a shortcut, not the exact gradient
    assert -1.0 <= cosine(grad, exact) <= 1.0


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("latent_path", ["false", "true"])
def test_truncated_with_k_equal_n_is_full(toy, target, latent_path):
    exact, _ = gradient(toy, "full", target, 8)
    grad, _ = gradient(toy, f"truncated[k=8,latent_path={latent_path}]", target, 8)
    assert rel_err(grad, exact) < 1e-12


@pytest.mark.parametrize("target", ["cond", "weights"])
def test_truncated_k1_equals_sdo_last(toy, target):
    """With one kept step, the last: both give a0 beta_1 d eps_1 / d theta."""
    truncated, _ = gradient(toy, "truncated[k=1]", target, 10)
    shortcut, _ = gradient(toy, "sdo[step=last]", target, 10)
    assert rel_err(truncated, shortcut) < 1e-12


def test_truncated_latent_path_keeps_the_identity_path(toy):
    """AlignProp keeps x_N's identity path: the gradient to x_N differs from SDO[last]'s pure
    identity only by the J term of the kept step."""
    aligned, _ = gradient(toy, "truncated[k=1,latent_path=true]", "latent", 10)
    identity, _ = gradient(toy, "sdo[step=last]", "latent", 10)
    assert float(aligned.norm()) > 0
    assert 1e-8 < rel_err(aligned, identity) < 0.5


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "spec,forward,vjp",
    [
        ("full", 16, 16),
        ("checkpoint", 32, 16),
        ("adjoint", 32, 16),
        ("adjoint[steps=40]", 56, 40),
        ("adjoint[recover=cache]", 32, 16),
        ("sdo", 16, 1),
        ("sdo[step=last]", 16, 1),
        ("sdo[step=0]", 16, 1),
        ("truncated[k=3,latent_path=true]", 16, 3),
        ("truncated[k=16]", 16, 16),
    ],
)
def test_counts_match_the_cost_model(toy, target, spec, forward, vjp):
    estimator = ESTIMATORS.create(spec)
    problem = toy.make_problem(target, 16, 0)
    if estimator.skip_reason(problem):
        pytest.skip("not applicable")
    if spec == "sdo[step=last]" and target == "latent":
        vjp = 0  # x_N's gradient is the identity path alone when the kept step is not the first
    estimator(problem, random.Random(0))
    assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (forward, vjp)
    cost = estimator.cost(16, target)
    assert (cost.nfe_forward, cost.nfe_vjp) == (forward, vjp)


@pytest.mark.parametrize(
    "spec", ["full", "checkpoint", "adjoint", "sdo", "truncated[k=2]", "truncated[k=2,latent_path=true]"]
)
@pytest.mark.parametrize("target", TARGETS)
def test_gradient_lands_only_on_requested_leaves_and_is_not_accumulated(toy, spec, target):
    estimator = ESTIMATORS.create(spec)
    problem = toy.make_problem(target, 6, 0)
    if estimator.skip_reason(problem):
        return
    estimator(problem, random.Random(0))
    first = problem.flat_grad().clone()
    estimator(problem, random.Random(0))
    torch.testing.assert_close(problem.flat_grad(), first, rtol=0, atol=0)  # overwritten, not summed
    assert float(first.norm()) > 0
    others = [problem.x_start, problem.cond, *problem.chain.denoiser.parameters()]
    for tensor in others:
        if not any(tensor is leaf for leaf in problem.leaves):
            assert tensor.grad is None


def test_random_choices_follow_the_rng(toy):
    counts = set()
    for seed in range(12):
        problem = toy.make_problem("cond", 10, 0)
        ESTIMATORS.create("truncated[rand=true,k_min=2,k_max=5]")(problem, random.Random(seed))
        counts.add(problem.chain.counter.vjp)
    assert counts <= {2, 3, 4, 5} and len(counts) >= 3
    a, _ = gradient(toy, "sdo[step=random]", "weights", 10, rng_seed=3)
    b, _ = gradient(toy, "sdo[step=random]", "weights", 10, rng_seed=3)
    assert torch.equal(a, b)
    draws = {tuple(gradient(toy, "sdo[step=random]", "weights", 10, rng_seed=s)[0][:3].tolist()) for s in range(8)}
    assert len(draws) >= 3


def test_skip_reasons_are_explicit(toy, toy_eta):
    latent = toy.make_problem("latent", 10, 0)
    assert "latent_path" in ESTIMATORS.create("truncated[k=2]").skip_reason(latent)
    assert ESTIMATORS.create("truncated[k=10]").skip_reason(latent) is None
    assert ESTIMATORS.create("truncated[k=2,latent_path=true]").skip_reason(latent) is None
    assert "eta" in ESTIMATORS.create("adjoint").skip_reason(toy_eta.make_problem("cond", 10, 0))


def test_write_gradients_hands_gradients_to_the_leaves_like_backward():
    import pytest as _pytest

    from estimators.base import write_gradients

    task = TASKS.create("toy[d=2,batch=2]")
    task.setup(torch.device("cpu"))
    for target in ("latent", "cond", "weights"):
        problem = task.make_problem(target, 3, 0)
        rest = [leaf for leaf in problem.leaves if leaf is not problem.x_start]
        latent = torch.ones_like(problem.x_start)
        write_gradients(problem, latent, [torch.full_like(leaf, 2.0) for leaf in rest[:-1]] + [None] * bool(rest))
        if target == "latent":
            assert torch.equal(problem.x_start.grad, latent) and not rest
        else:
            assert problem.x_start.grad is None and torch.equal(rest[-1].grad, torch.zeros_like(rest[-1]))
        with _pytest.raises(ValueError, match="leaves besides the latent"):
            write_gradients(problem, latent, rest + [latent])
    with _pytest.raises(ValueError, match="got no gradient"):
        write_gradients(task.make_problem("latent", 3, 0), None, [])
