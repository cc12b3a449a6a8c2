"""refl, drtune and direct-align against independent computations on the float64 toy: the clean estimate against
the mixture's posterior mean in closed form, each gradient against its formula, and DRTune at the
options where it is another estimator (sdo at K = 1; the exact gradient where no call depends on
its input)."""

import copy
import math
import random

import pytest
import torch
from torch import nn

from bench.chain import Chain
from bench.problem import Problem
from bench.registry import ESTIMATORS, TASKS
from conftest import gradient, rel_err


@pytest.fixture(scope="module")
def toy_flow():
    task = TASKS.create("toy[sampler=flow-euler]")
    task.setup(torch.device("cpu"))
    return task


def flat(tensors):
    """Gradients of several leaves as one vector, in the leaves' order (as Problem.flat_grad)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def posterior_mean(task, x, alpha, sigma):
    """E[x_0 | x_t = alpha x_0 + sigma noise] for the toy's mixture (equal weights, shared std s):
    sum_j w_j (mu_j + alpha s^2 / v (x - alpha mu_j)), v = alpha^2 s^2 + sigma^2."""
    s2, means = task.std**2, task.means
    v = alpha**2 * s2 + sigma**2
    logw = -((x[:, None, :] - alpha * means[None]) ** 2).sum(-1) / (2 * v)
    w = torch.softmax(logw, dim=1)
    comp = means[None] + (alpha * s2 / v) * (x[:, None, :] - alpha * means[None])
    return (w[..., None] * comp).sum(1)


@pytest.mark.parametrize("name", ["toy", "toy_flow"])
@pytest.mark.parametrize("i", [1, 4, 9])
def test_the_clean_estimate_is_the_posterior_mean_of_the_exact_model(request, name, i):
    """The toy's model is the exact noise (or velocity) of its mixture, so the estimate of x_0 from
    x_i is Tweedie's posterior mean: an independent closed form, epsilon and flow alike."""
    task = request.getfixturevalue(name)
    problem = task.make_problem("latent", 10, 0)
    schedule, chain = problem.chain.schedule, problem.chain
    x = torch.randn(16, task.d, generator=torch.Generator().manual_seed(i), dtype=torch.float64) * 1.5
    with torch.no_grad():
        estimate = schedule.clean_estimate(x, i, chain.eps(x, i, problem.cond))
    expected = posterior_mean(task, x, schedule.alpha(i), schedule.sigma(i))
    assert rel_err(estimate, expected) < 1e-7  # the flow model reads the mixture through an interpolated table


def test_the_clean_estimate_is_ddims_own_prediction_of_x0(toy):
    """diffusers' DDIMScheduler.step returns pred_original_sample: the same estimate."""
    problem = toy.make_problem("latent", 10, 0)
    schedule, chain = problem.chain.schedule, problem.chain
    scheduler = copy.deepcopy(toy.scheduler)
    scheduler.set_timesteps(10)
    x = problem.x_start.detach()
    for i, t in zip(range(10, 0, -1), scheduler.timesteps):
        out = chain.eps(x, i, problem.cond).detach()
        theirs = scheduler.step(out, t, x).pred_original_sample
        assert rel_err(schedule.clean_estimate(x, i, out), theirs) < 1e-5  # its alphas_cumprod is float32
        x = scheduler.step(out, t, x).prev_sample


def _refl_closed_form(task, target, steps, k):
    """dR(x^_0)/d(leaves) at x^_0 = (x_k - sigma_k out_k) / alpha_k, x_k sampled without graph."""
    problem = task.make_problem(target, steps, 0)
    chain, schedule = problem.chain, problem.chain.schedule
    _, states = chain.sample(problem.x_start, problem.cond, problem.noises, keep_states=True)
    x_k = problem.x_start if k == steps else states[steps - k]
    out = chain.eps(x_k, k, problem.cond)
    x_hat = (x_k - schedule.sigma(k) * out) / schedule.alpha(k)
    loss = -problem.reward_fn(x_hat).mean()
    return flat(torch.autograd.grad(loss, problem.leaves))


@pytest.mark.parametrize("target,step", [("cond", "3"), ("weights", "7"), ("weights", "9"), ("latent", "0")])
def test_refl_is_the_reward_gradient_of_its_clean_estimate(toy, target, step):
    steps = 10
    grad, problem = gradient(toy, f"refl[step={step}]", target, steps)
    expected = _refl_closed_form(toy, target, steps, steps - int(step))
    assert float(expected.norm()) > 0
    assert rel_err(grad, expected) < 1e-12
    assert problem.chain.counter.forward == int(step) + 1 and problem.chain.counter.vjp == 1


def test_refl_draws_its_step_in_the_late_window(toy):
    """window = 0.25 of N = 20: k in the last 5 calls, so 16..20 forwards; the draws follow the rng."""
    forwards = set()
    for seed in range(12):
        _, problem = gradient(toy, "refl[window=0.25]", "weights", 20, rng_seed=seed)
        forwards.add(problem.chain.counter.forward)
    assert forwards <= set(range(16, 21)) and len(forwards) >= 3
    a, _ = gradient(toy, "refl", "weights", 20, rng_seed=5)
    b, _ = gradient(toy, "refl", "weights", 20, rng_seed=5)
    assert torch.equal(a, b)


def test_refl_skips_the_latent_with_the_reason(toy):
    problem = toy.make_problem("latent", 10, 0)
    assert "latent gets no gradient" in ESTIMATORS.create("refl").skip_reason(problem)
    assert ESTIMATORS.create("refl[step=0]").skip_reason(problem) is None


def _drtune_closed_form(task, target, steps, kept):
    """sum_{k in kept} W_k (d out_k(sg x_k) / d leaves)^T g with g = dL/dx_0 at the sampler's x_0,
    plus W_x g for the latent."""
    problem = task.make_problem(target, steps, 0)
    chain, schedule = problem.chain, problem.chain.schedule
    x0, states = chain.sample(problem.x_start, problem.cond, problem.noises, keep_states=True)
    x0 = x0.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.loss(x0)[0], x0)
    if target == "latent":
        return (schedule.state_weight * g).reshape(-1)
    total = None
    for k in kept:
        out = chain.eps(states[steps - k].detach(), k, problem.cond)
        grads = torch.autograd.grad(out, problem.leaves, schedule.output_weight(k) * g)
        part = flat(grads)
        total = part if total is None else total + part
    return total


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_drtune_matches_its_closed_form(toy, target, k):
    steps = 10
    estimator = ESTIMATORS.create(f"drtune[k={k},offset=first]")
    kept = estimator.kept(toy.make_problem(target, steps, 0).chain.schedule.effective_steps(), None)
    assert len(set(kept)) == k and kept[0] == steps
    grad, problem = gradient(toy, f"drtune[k={k},offset=first]", target, steps)
    expected = _drtune_closed_form(toy, target, steps, kept)
    assert float(expected.norm()) > 0
    assert rel_err(grad, expected) < 1e-12
    assert problem.chain.counter.vjp == (0 if target == "latent" else k)


@pytest.mark.parametrize("target", ["cond", "weights"])
def test_drtune_with_one_call_at_the_first_step_is_sdo(toy, target):
    ours, _ = gradient(toy, "drtune[k=1,offset=first]", target, 10)
    theirs, _ = gradient(toy, "sdo[step=first]", target, 10)
    assert rel_err(ours, theirs) < 1e-12


class StateFree(nn.Module):
    """A denoiser whose output ignores its input: out = tanh(w t / 1000 + c), broadcast."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, d, dtype=torch.float64))

    def forward(self, x, t, cond):
        return torch.tanh(self.w * (t[:, None] / 1000) + cond).expand_as(x)


@pytest.mark.parametrize("target", ["cond", "weights"])
def test_drtune_with_every_call_is_exact_where_no_call_depends_on_its_input(toy, target):
    """DRTune drops exactly the calls' input Jacobians: with K = N on a chain whose outputs ignore
    the state it is the exact gradient of the chain (full)."""
    grads = []
    for spec in ("drtune[k=12]", "full"):
        denoiser = StateFree(toy.d)
        cond = torch.full((toy.d,), 0.3, dtype=torch.float64, requires_grad=target == "cond")
        x_start = torch.randn(6, toy.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        leaves = [cond] if target == "cond" else list(denoiser.parameters())
        problem = Problem(
            chain=Chain(denoiser, toy.make_schedule(12)),
            x_start=x_start,
            cond=cond,
            noises=None,
            reward_fn=lambda x: -((x - 0.7) ** 2).sum(-1) + torch.sin(3 * x).sum(-1),
            target=target,
            leaves=leaves,
        )
        ESTIMATORS.create(spec)(problem, random.Random(0))
        grads.append(problem.flat_grad().clone())
    assert float(grads[1].norm()) > 0
    assert rel_err(grads[0], grads[1]) < 1e-12


def test_drtune_spreads_its_calls_from_a_random_offset():
    estimator = ESTIMATORS.create("drtune[k=4]")
    effective = tuple(range(20, 0, -1))
    draws = {tuple(estimator.kept(effective, random.Random(seed))) for seed in range(10)}
    assert len(draws) > 1
    for kept in draws:
        gaps = [a - b for a, b in zip(kept, kept[1:])]
        assert len(kept) == 4 and all(4 <= gap <= 6 for gap in gaps) and math.isclose(sum(gaps) / 3, 5, abs_tol=1)


def _direct_align_closed_form(task, target, steps, s):
    """x_s = alpha_s x_0 + sigma_s x_N from the sampler's detached x_0, one step, and the known
    noise removed at the next grid point: x^_0 = (x_{s-1} - sigma_{s-1} x_N) / alpha_{s-1}."""
    problem = task.make_problem(target, steps, 0)
    chain, schedule = problem.chain, problem.chain.schedule
    xi = problem.x_start.detach()
    x0 = chain.sample(xi, problem.cond)
    x_s = schedule.alpha(s) * x0 + schedule.sigma(s) * xi
    out = chain.eps(x_s, s, problem.cond)
    if schedule.prediction == "flow":
        landed = x_s + (schedule.sigma(s - 1) - schedule.sigma(s)) * out
    else:  # DDIM at eta = 0 onto grid point s - 1
        clean = (x_s - schedule.sigma(s) * out) / schedule.alpha(s)
        landed = schedule.alpha(s - 1) * clean + schedule.sigma(s - 1) * out
    recovered = (landed - schedule.sigma(s - 1) * xi) / schedule.alpha(s - 1)
    loss = -problem.reward_fn(recovered).mean()
    return flat(torch.autograd.grad(loss, problem.leaves))


@pytest.mark.parametrize("name", ["toy", "toy_flow"])
@pytest.mark.parametrize("target,step", [("cond", "0"), ("weights", "4"), ("weights", "9")])
def test_direct_align_matches_its_closed_form(request, name, target, step):
    """N = 10 divides T = 1000, so every step lands on the next grid point: the landing level is
    (alpha_{s-1}, sigma_{s-1}) and the recovery is the formula above."""
    task = request.getfixturevalue(name)
    steps = 10
    s = steps - int(step)
    schedule = task.make_problem("cond", steps, 0).chain.schedule
    landing = ESTIMATORS.get("direct-align").landing(schedule, s)
    assert landing == pytest.approx((schedule.alpha(s - 1), schedule.sigma(s - 1)), rel=1e-12, abs=1e-14)
    grad, problem = gradient(task, f"direct-align[step={step}]", target, steps)
    expected = _direct_align_closed_form(task, target, steps, s)
    assert float(expected.norm()) > 0
    assert rel_err(grad, expected) < 1e-12
    assert problem.chain.counter.forward == steps + 1 and problem.chain.counter.vjp == 1


def test_direct_align_skips_what_it_cannot_serve(toy, toy_eta):
    estimator = ESTIMATORS.create("direct-align")
    assert "gets no gradient" in estimator.skip_reason(toy.make_problem("latent", 10, 0))
    assert "stochastic or multistep" in estimator.skip_reason(toy_eta.make_problem("cond", 10, 0))
    assert estimator.skip_reason(toy.make_problem("weights", 10, 0)) is None


@pytest.mark.parametrize("name", ["toy", "toy_flow"])
@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_leapalign_on_two_steps_without_discount_is_the_chains_gradient(request, name, target):
    """On N = 2 the two leaps are the sampler's own steps (N divides T: each lands on the next grid
    point), so with the nested term whole the gradient is the exact one."""
    task = request.getfixturevalue(name)
    ours, _ = gradient(task, "leapalign[first=0,second=1,discount=1]", target, 2)
    exact, _ = gradient(task, "full", target, 2)
    assert float(exact.norm()) > 0
    assert rel_err(ours, exact) < 1e-10


def _leapalign_closed_form(task, target, steps, k, j, g):
    """R at the rollout's x_0, its gradient g0 pulled back along the two leaps written out: the
    second leap's Jacobians (its linear path whole, its call's input Jacobian times g) applied to
    the first leap's derivative, plus the second call's own parameter derivative."""
    problem = task.make_problem(target, steps, 0)
    chain, schedule = problem.chain, problem.chain.schedule
    x0, states = chain.sample(problem.x_start, problem.cond, keep_states=True)
    x0 = x0.detach().requires_grad_(True)
    (g0,) = torch.autograd.grad(problem.loss(x0)[0], x0)
    x_j = states[steps - j].detach().requires_grad_(True)

    def second(x_lin, x_in):
        out = chain.eps(x_in, j, problem.cond)
        clean = (
            (x_lin - schedule.sigma(j) * out) / schedule.alpha(j)
            if schedule.prediction != "flow"
            else x_lin - schedule.sigma(j) * out
        )
        noise = (x_lin - schedule.alpha(j) * clean) / schedule.sigma(j)
        return schedule.alpha(0) * clean + schedule.sigma(0) * noise

    x_in = x_j.detach().requires_grad_(True)
    out2 = second(x_j, x_in)
    grads = torch.autograd.grad(out2, [x_j, x_in, *problem.leaves], g0, allow_unused=True)
    through_j = grads[0] + g * grads[1]  # dL/dx_j': the linear path whole, the call's input Jacobian discounted
    direct = [torch.zeros_like(leaf) if gr is None else gr for leaf, gr in zip(problem.leaves, grads[2:])]
    x_k = problem.x_start if k == steps else states[steps - k].detach()
    out1 = chain.eps(x_k, k, problem.cond)
    clean1 = schedule.clean_estimate(x_k, k, out1)
    first = schedule.alpha(j) * clean1 + schedule.sigma(j) * (x_k - schedule.alpha(k) * clean1) / schedule.sigma(k)
    via_first = torch.autograd.grad(first, problem.leaves, through_j, allow_unused=True)
    total = [d + (torch.zeros_like(d) if v is None else v) for d, v in zip(direct, via_first)]
    return flat(total)


@pytest.mark.parametrize("name", ["toy", "toy_flow"])
@pytest.mark.parametrize("target,first,second", [("latent", "0", "3"), ("cond", "2", "6"), ("weights", "1", "8")])
@pytest.mark.parametrize("discount", [0.0, 0.5])
def test_leapalign_matches_its_closed_form(request, name, target, first, second, discount):
    task = request.getfixturevalue(name)
    steps = 10
    spec = f"leapalign[first={first},second={second},discount={discount}]"
    grad, problem = gradient(task, spec, target, steps)
    expected = _leapalign_closed_form(task, target, steps, steps - int(first), steps - int(second), discount)
    assert float(expected.norm()) > 0
    assert rel_err(grad, expected) < 1e-10
    assert problem.chain.counter.forward == steps + 2 and problem.chain.counter.vjp == 2
    values = problem.chain.sample(problem.x_start, problem.cond)
    assert torch.equal(ESTIMATORS.create(spec)(problem, random.Random(0)).x0, values)  # connectors: the rollout's x_0


def test_leapalign_draws_its_leaps_in_order():
    estimator = ESTIMATORS.create("leapalign")
    draws = {estimator.leap_points(12, random.Random(seed)) for seed in range(30)}
    assert all(12 >= k > j >= 1 for k, j in draws) and len(draws) > 10


FLOWBP_POINTS = [
    # (flowbp options, the estimator it is, targets)
    ("k=0,bridge=1", "full", ["latent", "cond", "weights"]),
    ("k=3,offset=first,bridge=0", "drtune[k=3,offset=first]", ["latent", "cond", "weights"]),
    ("k=1,offset=first,bridge=1", "sdo[step=first]", ["latent", "cond", "weights"]),
    ("reward_input=mean,k=1,offset=first", "refl[step=0]", ["cond", "weights"]),
]


@pytest.mark.parametrize("name", ["toy", "toy_flow"])
@pytest.mark.parametrize("options,other,targets", FLOWBP_POINTS)
def test_flowbp_at_the_matching_options_is_the_estimator_it_contains(request, name, options, other, targets):
    task = request.getfixturevalue(name)
    for target in targets:
        ours, _ = gradient(task, f"flowbp[{options}]", target, 10)
        theirs, _ = gradient(task, other, target, 10)
        assert float(theirs.norm()) > 0
        assert rel_err(ours, theirs) < 1e-10, (target, options)


def test_flowbp_on_the_injected_noises(toy_eta):
    """With every call coupled it is the exact gradient on the noise target too; with stopped
    inputs the noises reach x_0 by the linear path alone (no VJP), as DRTune's do."""
    ours, _ = gradient(toy_eta, "flowbp[k=0,bridge=1]", "noise", 10)
    exact, _ = gradient(toy_eta, "full", "noise", 10)
    assert rel_err(ours, exact) < 1e-10
    stopped, problem = gradient(toy_eta, "flowbp[k=3,offset=first]", "noise", 10)
    drtune, _ = gradient(toy_eta, "drtune[k=3,offset=first]", "noise", 10)
    assert float(stopped.norm()) > 0 and rel_err(stopped, drtune) < 1e-12 and problem.chain.counter.vjp == 0


@pytest.mark.parametrize("name", ["toy", "toy_flow"])
@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_flowbp_lagrange_weights_match_their_closed_form(request, name, target):
    """Each step's output read as the linear interpolant (in s) of the active outputs: the
    gradient is sum_a w_a VJP(out_a(sg x_a)) + W_x g, with w_a from numpy's interp, and the weights
    sum to the steps' total weight."""
    import numpy as np

    task = request.getfixturevalue(name)
    steps = 12
    estimator = ESTIMATORS.create("flowbp[k=4,offset=first,weights=lagrange]")
    problem = task.make_problem(target, steps, 0)
    chain, schedule = problem.chain, problem.chain.schedule
    active = estimator.active_set(schedule.effective_steps(), None)
    nodes = sorted(active, key=schedule.ode_point)
    points = np.array([schedule.ode_point(a) for a in nodes])
    weights = {}
    for a_index, a in enumerate(nodes):
        basis = np.eye(len(nodes))[a_index]
        weights[a] = sum(
            schedule.output_weight(i) * float(np.interp(schedule.ode_point(i), points, basis))
            for i in range(1, steps + 1)
        )
    assert sum(weights.values()) == pytest.approx(sum(schedule.output_weight(i) for i in range(1, steps + 1)))
    x0, states = chain.sample(problem.x_start, problem.cond, keep_states=True)
    x0 = x0.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.loss(x0)[0], x0)
    if target == "latent":
        expected = (schedule.state_weight * g).reshape(-1)
    else:
        expected = 0
        for a in active:
            out = chain.eps(states[steps - a].detach(), a, problem.cond)
            grads = torch.autograd.grad(out, problem.leaves, weights[a] * g)
            expected = expected + flat(grads)
    grad, _ = gradient(task, "flowbp[k=4,offset=first,weights=lagrange]", target, steps)
    assert rel_err(grad, expected) < 1e-10


def test_flowbp_refuses_what_its_axes_cannot_combine():
    from bench.errors import SpecError

    with pytest.raises(SpecError, match="use bridge=0"):
        ESTIMATORS.create("flowbp[weights=lagrange,bridge=0.5]")


@pytest.mark.parametrize("name", ["toy", "toy_flow"])
@pytest.mark.parametrize("target", ["cond", "weights"])
def test_diffusion_nft_is_the_reward_split_forward_process_loss(request, name, target):
    """On-policy the implicit policies' loss has the gradient of mean_b beta (2 r_b - 1) ||out_b -
    target_b||^2 / D, with the same draws of grid points and noise (the estimator's rng)."""
    from estimators.diffusion_nft import DiffusionNFT
    from estimators.randomness import torch_generator

    task = request.getfixturevalue(name)
    grad, _ = gradient(task, "diffusion-nft[beta=0.5]", target, 10)
    problem = task.make_problem(target, 10, 0)
    chain, schedule = problem.chain, problem.chain.schedule
    x0 = chain.sample(problem.x_start, problem.cond)
    r = DiffusionNFT.optimality(problem.reward_fn(x0).detach())
    generator = torch_generator(random.Random(0))
    effective = schedule.effective_steps()
    picks = [effective[int(p)] for p in torch.randint(len(effective), (x0.shape[0],), generator=generator)]
    xi = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    alpha = torch.tensor([schedule.alpha(i) for i in picks], dtype=x0.dtype)[:, None]
    sigma = torch.tensor([schedule.sigma(i) for i in picks], dtype=x0.dtype)[:, None]
    times = torch.tensor([schedule.model_time(i) for i in picks], dtype=x0.dtype)
    out = chain.denoiser(alpha * x0 + sigma * xi, times, problem.cond)
    target_out = xi - x0 if schedule.prediction == "flow" else xi
    loss = (0.5 * (2 * r - 1) * ((out - target_out) ** 2).mean(1)).mean()
    expected = flat(torch.autograd.grad(loss, problem.leaves))
    assert float(expected.norm()) > 0
    assert rel_err(grad, expected) < 1e-10


def test_diffusion_nft_needs_no_differentiable_reward():
    task = TASKS.create("toy[reward=inside]")
    task.setup(torch.device("cpu"))
    grad, problem = gradient(task, "diffusion-nft", "weights", 8)
    assert torch.isfinite(grad).all()
    assert problem.chain.counter.forward == 9 and problem.chain.counter.vjp == 1
