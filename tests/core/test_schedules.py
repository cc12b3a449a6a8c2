"""Schedules users have: diffusers' DDIMScheduler defaults (leading spacing, steps_offset = 0) end
on an identity step (two grid points at one rho, injected-noise scale 0), trailing spacing at
N = T does the same, and set_alpha_to_one = True makes the last step noiseless. No estimator may
crash, return NaN or give a silent zero there (issue 9, defects 1-4)."""

import math
import random

import pytest
import torch
from diffusers import DDIMScheduler

from bench.chain import Schedule
from bench.errors import Diverged
from bench.registry import ESTIMATORS, TASKS
from bench.run.runner import SweepSpec, run_sweep

from conftest import cosine, gradient, rel_err

# The built-in estimators (plug-ins that other tests register in this process are not the subject).
BUILT_IN = [name for name in ESTIMATORS.names() if ESTIMATORS.get(name).__module__.startswith("estimators.")]

LEADING = "toy[d=2,batch=6,spacing=leading]"  # DDIMScheduler's defaults: t_1 = 0
NOISELESS_END = "toy[d=2,batch=6,eta=1.0,alpha_to_one=true]"  # s_1 = 0, b_1 != 0


def _task(spec):
    task = TASKS.create(spec)
    task.setup(torch.device("cpu"))
    return task


@pytest.fixture(scope="module")
def leading():
    return _task(LEADING)


def test_leading_offset_zero_ends_on_an_exact_identity_step():
    schedule = Schedule.from_scheduler(
        DDIMScheduler(set_alpha_to_one=False, clip_sample=False), 10
    )  # diffusers' defaults
    assert schedule.model_time(1) == 0 and schedule.is_identity(1)
    assert schedule.coefficients(1) == (1.0, 0.0, 0.0)
    assert schedule.effective_steps() == tuple(range(10, 1, -1))
    assert schedule.rho(0) == schedule.rho(1)
    trailing = Schedule.from_scheduler(
        DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False), 1000
    )
    assert trailing.is_identity(1) and not any(trailing.is_identity(i) for i in range(2, 1001))
    noiseless = Schedule.from_scheduler(DDIMScheduler(set_alpha_to_one=True, clip_sample=False), 10, eta=1.0)
    a, b, s = noiseless.coefficients(1)
    assert s == 0.0 and b != 0.0 and not noiseless.is_identity(1)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_toy_schedule_options_reach_the_scheduler(eta):
    """The toy's chain on a leading / offset / alpha-to-one schedule is diffusers' DDIM step."""
    task = _task(f"toy[d=3,spacing=leading,offset=0,alpha_to_one=true,eta={eta}]")
    reference = DDIMScheduler(**{**task.scheduler.config})
    reference.set_timesteps(10)
    problem = task.make_problem("latent", 10, 0)
    x = problem.x_start.detach()
    for i, t in zip(range(10, 0, -1), reference.timesteps):
        eps = problem.chain.eps(x, i, problem.cond).detach()
        noise = problem.noises[i - 1] if eta > 0 else None
        ours = problem.chain.schedule.step(x, i, eps, noise)
        theirs = reference.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        x = ours
    assert int(reference.timesteps[-1]) == 0


def test_cached_adjoint_on_its_own_grid_survives_an_identity_step(leading):
    """Defect 1: M != N divided by the zero rho difference of the identity step."""
    exact, _ = gradient(leading, "full", "cond", 10)
    grad, problem = gradient(leading, "adjoint[steps=7,recover=cache]", "cond", 10)
    assert torch.isfinite(grad).all() and cosine(grad, exact) > 0.99
    # On the cached (piecewise-linear) path, finer adjoint grids converge at first order.
    g40, g160, g640 = (gradient(leading, f"adjoint[steps={m},recover=cache]", "cond", 10)[0] for m in (40, 160, 640))
    assert rel_err(g160, g640) < 0.5 * rel_err(g40, g160)


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_torchdiffeq_adjoint_drops_the_identity_interval(leading, target):
    """Defect 2: torchdiffeq refused the repeated rho; the identity step is no ODE interval, so
    the result is still the cached-state adjoint, with one call pair fewer."""
    ours, _ = gradient(leading, "adjoint[recover=cache]", target, 10)
    theirs, problem = gradient(leading, "torchdiffeq-adjoint", target, 10)
    assert rel_err(theirs, ours) < 1e-12
    assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (18, 9)
    cost = ESTIMATORS.create("torchdiffeq-adjoint").cost_for(problem)
    assert (cost.nfe_forward, cost.nfe_vjp) == (18, 9)


def _score_function_mean(task, target, steps, calls):
    problem = task.make_problem(target, steps, 0)
    estimator, rng = ESTIMATORS.create("score-function"), random.Random(5)
    grads = []
    for _ in range(calls):
        estimator(problem, rng)
        grads.append(problem.flat_grad().clone())
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / calls**0.5


def _pathwise_mean(task, target, steps, draws):
    problem = task.make_problem(target, steps, 0)
    generator = torch.Generator().manual_seed(11)
    grads = []
    for _ in range(draws):
        problem.noises = [
            torch.randn(problem.x_start.shape, generator=generator, dtype=torch.float64) for _ in range(steps)
        ]
        ESTIMATORS.create("full")(problem, random.Random(0))
        grads.append(problem.flat_grad().clone())
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / draws**0.5


@pytest.mark.parametrize(
    "spec,target",
    [
        ("toy[eta=1.0,batch=256,alpha_to_one=true]", "cond"),
        ("toy[eta=1.0,batch=256,alpha_to_one=true]", "weights"),
        ("toy[eta=1.0,batch=256,spacing=leading]", "weights"),
    ],
)
def test_score_function_is_unbiased_when_the_last_step_injects_no_noise(spec, target):
    """Defect 3: log N(x; mu, 0) was NaN. The noiseless final step now enters as a pathwise term
    (alpha_to_one: b_1 != 0) or not at all (an identity step), and the estimate stays unbiased:
    its mean matches the mean pathwise gradient over resampled noise, within 5 standard errors,
    while a sign flip or a factor 2 would not."""
    task = _task(spec)
    mean, stderr = _score_function_mean(task, target, 4, calls=300)
    reference, reference_err = _pathwise_mean(task, target, 4, draws=200)
    assert torch.isfinite(mean).all()
    assert rel_err(mean, reference) < 0.2
    assert ((mean - reference).abs() <= 5 * (stderr**2 + reference_err**2).sqrt()).all()
    assert rel_err(-mean, reference) > 1.5 and rel_err(2 * mean, reference) > 0.5


def test_score_function_without_the_pathwise_term_would_be_biased(monkeypatch):
    """The pathwise term is needed: the score terms alone miss the last step's dependence on the
    weights (this is what makes the unbiasedness test above able to fail)."""
    task = _task("toy[eta=1.0,batch=256,alpha_to_one=true]")
    from estimators import score_function

    monkeypatch.setattr(score_function.ScoreFunction, "_pathwise_term", staticmethod(lambda *args: None))
    mean, stderr = _score_function_mean(task, "cond", 4, calls=300)
    reference, reference_err = _pathwise_mean(task, "cond", 4, draws=200)
    assert not ((mean - reference).abs() <= 5 * (stderr**2 + reference_err**2).sqrt()).all()


def test_score_function_with_a_noiseless_last_step_and_an_indicator_reward_is_skipped(tmp_path):
    rows = run_sweep(
        SweepSpec(
            tasks=["toy[d=2,eta=1.0,alpha_to_one=true,reward=inside]"],
            estimators=["score-function"],
            targets=["cond"],
            steps=[4],
            iters=1,
            rounds=1,
            memory="off",
        ),
        tmp_path,
    )
    assert rows[0]["status"] == "skipped" and "pathwise" in rows[0]["reason"]


@pytest.mark.parametrize("target", ["cond", "weights"])
def test_one_kept_step_is_the_last_step_that_matters(leading, target):
    """Defect 4: truncated[k=1], sdo[step=last] and draft-lv kept the identity step and gave an
    exactly zero gradient. They keep the last effective step (grid index 2, sampling index 8)."""
    truncated, problem = gradient(leading, "truncated[k=1]", target, 10)
    assert float(truncated.norm()) > 0 and problem.chain.counter.vjp == 1
    last, _ = gradient(leading, "sdo[step=last]", target, 10)
    by_index, _ = gradient(leading, "sdo[step=8]", target, 10)
    assert rel_err(last, truncated) < 1e-12 and rel_err(by_index, truncated) < 1e-12
    exact, _ = gradient(leading, "full", target, 10)
    assert cosine(truncated, exact) > 0.5
    lv, _ = gradient(leading, "draft-lv", target, 10)
    assert float(lv.norm()) > 0 and cosine(lv, exact) > 0.5
    for k in (9, 10):  # every effective step kept: the exact gradient
        everything, _ = gradient(leading, f"truncated[k={k}]", target, 10)
        assert rel_err(everything, exact) < 1e-12
    skipped = ESTIMATORS.create("sdo[step=9]").skip_reason(leading.make_problem(target, 10, 0))
    assert skipped and "identity step" in skipped


def test_truncated_keeping_every_effective_step_reaches_the_latent(leading):
    exact, _ = gradient(leading, "full", "latent", 10)
    grad, _ = gradient(leading, "truncated[k=9]", "latent", 10)
    assert rel_err(grad, exact) < 1e-12


@pytest.mark.parametrize(
    "schedule", ["spacing=leading", "spacing=leading,alpha_to_one=true", "spacing=leading,offset=1"]
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_estimator_runs_on_identity_ending_schedules(tmp_path, schedule, eta):
    """Every registered estimator on every target at N = 10, through the sweep: ok with a finite,
    non-zero gradient, or skipped with a reason; never an error, NaN or a silent zero."""
    targets = ["latent", "cond", "weights"] + (["noise"] if eta > 0 else [])
    estimators = BUILT_IN
    spec = SweepSpec(
        tasks=[f"toy[d=2,batch=2,{schedule},eta={eta}]"],
        estimators=estimators,
        targets=targets,
        steps=[10],
        iters=1,
        rounds=1,
        memory="off",
    )
    rows = run_sweep(spec, tmp_path)
    assert len(rows) == len(estimators) * len(targets)
    for row in rows:
        where = f"{row['estimator']} on {row['target']}"
        assert row["status"] in ("ok", "skipped"), f"{where}: {row.get('error')}"
        if row["status"] == "skipped":
            assert len(row["reason"]) > 20, where
            continue
        assert math.isfinite(row["grad_cos"]) and row["grad_norm"] > 0, where
        assert math.isfinite(row["reward_final"]), where


@pytest.mark.slow
@pytest.mark.parametrize("eta,target", [(0.0, "cond"), (1.0, "weights")])
def test_every_estimator_runs_at_trailing_n_equal_t(eta, target):
    """Trailing spacing at N = T = 1000 also ends on an identity step. One call of each estimator
    (a sweep cell would take several): finite and non-zero where served, exact ones exact."""
    task = _task(f"toy[d=2,batch=2,eta={eta}]")
    exact, _ = gradient(task, "full", target, 1000)
    assert task.make_problem(target, 1000, 0).chain.schedule.is_identity(1)
    served = 0
    # eta = 1: the estimators that need the stochastic sampler (the rest ran at eta = 0 above)
    names = BUILT_IN if eta == 0 else ["score-function", "dno", "full", "sdo"]
    for name in names:
        spec = "zeroth-order[n=1]" if name == "zeroth-order" else name
        estimator, problem = ESTIMATORS.create(spec), task.make_problem(target, 1000, 0)
        if estimator.skip_reason(problem):
            continue
        if name == "edict":  # its inverse's rounding error grows like p^-2N: refused, never a wrong gradient
            with pytest.raises(Diverged, match="inverse lost the forward trajectory"):
                estimator(problem, random.Random(0))
            continue
        estimator(problem, random.Random(0))
        grad = problem.flat_grad()
        assert torch.isfinite(grad).all() and float(grad.norm()) > 0, spec
        if estimator.exact and estimator.reference_spec() == "full":
            assert rel_err(grad, exact) < 1e-8, spec
        served += 1
    assert served >= (7 if eta == 0 else 3)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m", "flow-euler"])
@pytest.mark.parametrize("alpha_to_one", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_an_adjoint_grid_has_no_interval_of_rounding_width(sampler, alpha_to_one, spacing):
    """Issue 21, item 4: with diffusers' default linear betas and set_alpha_to_one=False, rho at the
    clean end came from two formulas an ulp apart, and ode_grid(M) opened with an interval of
    1.7e-18: one of the M adjoint evaluations wasted. Every interval is a real step now. And at
    N = 1 on leading or linspace spacing with set_alpha_to_one=True (t_1 = 0, rho from 0 to
    rho(t = 0), where the model time is clamped throughout) ode_grid(2) was [0, rho(0),
    rho(0) - 1 ulp]: the grid uniform in model time collapsed onto its end; it is uniform in s."""
    from bench.samplers import make_sampler

    config = dict(DDIMScheduler(set_alpha_to_one=alpha_to_one, timestep_spacing=spacing, clip_sample=False).config)
    for steps in (1, 4, 10, 25):
        schedule = make_sampler(sampler).schedule(config, steps)
        own = [schedule.ode_point(i) for i in range(steps + 1)]
        span = own[-1] - own[0]
        if span == 0:  # ddim, leading, N = 1, abar_0 = abar_1: one identity step, nothing to grid
            assert sampler == "ddim" and schedule.is_identity(1)
            continue
        for points in (1, 2, 3, 5, 20, 64):
            grid = schedule.ode_grid(points)
            assert len(grid) == points + 1
            assert grid[0] == own[0] and abs(grid[-1] - own[-1]) <= 1e-12 * span
            smallest = min(b - a for a, b in zip(grid, grid[1:]))
            assert smallest > 1e-6 * span, (steps, points, smallest)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_a_one_step_grid_inside_the_clamped_model_time_is_uniform(spacing):
    """The N = 1 grid ending at abar = 1 lies below rho(t = 0) throughout (t_1 = 0): its finer
    ODE grids are uniform in s = rho, each point's model time 0."""
    from bench.samplers import make_sampler

    config = dict(DDIMScheduler(set_alpha_to_one=True, timestep_spacing=spacing, clip_sample=False).config)
    schedule = make_sampler("ddim").schedule(config, 1)
    assert schedule.model_time(1) == 0 and schedule.rho(0) == 0
    for points in (2, 3, 64):
        grid = schedule.ode_grid(points)
        rho = schedule.rho(1)
        assert grid == pytest.approx([rho * j / points for j in range(points + 1)], rel=1e-12, abs=1e-18)
        assert all(abs(schedule.ode_time(s)) <= 1e-9 for s in grid)
