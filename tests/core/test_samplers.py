"""Samplers (bench/samplers/): each one's trajectory against the diffusers scheduler's own `step`
loop, its linear structure against autograd, and the exact estimators on every sampler."""

import random

import pytest
import torch

from bench.chain import Chain, noise_for
from bench.errors import SpecError
from bench.registry import ESTIMATORS, TASKS
from bench.samplers import SAMPLERS, make_sampler
from tasks.toy import MixtureDenoiser

VP_CONFIGS = {
    "sd-trailing": dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        clip_sample=False,
    ),
    "linear-linspace": dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        timestep_spacing="linspace",
        set_alpha_to_one=True,
        clip_sample=False,
    ),
    "cosine-leading": dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        timestep_spacing="leading",
        steps_offset=1,
        clip_sample=False,
    ),
}
SAMPLER_CASES = (
    [("ddim", c) for c in VP_CONFIGS]
    + [("dpmpp2m", c) for c in VP_CONFIGS]
    + [
        ("dpmpp2m[order=1]", "sd-trailing"),
        ("dpmpp2m[lower_order_final=false]", "linear-linspace"),
        ("flow-euler", "flow"),
        ("flow-euler[shift=3]", "flow"),
    ]
)


def mixture_model(config: dict, flow: bool, dtype=torch.float32) -> MixtureDenoiser:
    """The toy's exact mixture model (d = 3) as the denoiser, epsilon or velocity."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    from diffusers import DDPMScheduler

    table = DDPMScheduler(
        **{k: v for k, v in config.items() if k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}
    ).alphas_cumprod.double()
    return MixtureDenoiser(
        means, torch.zeros(5, dtype=torch.float64), 0.3, table, flow_timesteps=1000 if flow else None
    ).to(dtype)


@pytest.mark.parametrize("spec,config", SAMPLER_CASES)
@pytest.mark.parametrize("steps", [1, 4, 10, 16, 25])
def test_trajectory_equals_the_diffusers_step_loop(spec, config, steps):
    sampler = make_sampler(spec)
    table = VP_CONFIGS.get(config, {"num_train_timesteps": 1000})
    # float64 in, and the scheduler's sigmas in float64 (the same numbers): diffusers rounds the
    # state to float32 in each DPM-Solver and flow step, about 1e-7; with float32 sigmas its data
    # prediction at rho_N ~ 160 loses 1e-6 more to cancellation
    model = mixture_model(VP_CONFIGS.get(config, VP_CONFIGS["sd-trailing"]), flow=config == "flow", dtype=torch.float64)
    schedule = sampler.schedule(table, steps)
    generator = torch.Generator().manual_seed(steps)
    x_start = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    ours = Chain(model, schedule).sample(x_start, None)
    reference = sampler.scheduler(table)
    reference.set_timesteps(steps)
    if hasattr(reference, "sigmas"):
        reference.sigmas = reference.sigmas.double()
    x = x_start.clone()
    for k, t in enumerate(reference.timesteps):
        assert schedule.model_time(steps - k) == pytest.approx(float(t), abs=1e-3)
        out = model(x, torch.full((x.shape[0],), float(t), dtype=x.dtype), None)
        x = reference.step(out, t, x).prev_sample
    assert float((ours - x).norm() / x.norm()) < 1e-6


@pytest.mark.parametrize("config", sorted(VP_CONFIGS))
def test_stochastic_ddim_equals_diffusers_with_the_same_noise(config):
    steps, eta = 12, 0.8
    model = mixture_model(VP_CONFIGS[config], flow=False, dtype=torch.float64)
    sampler = make_sampler("ddim")
    schedule = sampler.schedule(VP_CONFIGS[config], steps, eta=eta)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    noises = [torch.randn(6, 3, generator=generator, dtype=torch.float64) for _ in range(steps)]
    ours = Chain(model, schedule).sample(x, None, noises)
    reference = sampler.scheduler(VP_CONFIGS[config])
    reference.set_timesteps(steps)
    for k, t in enumerate(reference.timesteps):
        out = model(x, torch.full((6,), float(t), dtype=torch.float64), None)
        x = reference.step(out, t, x, eta=eta, variance_noise=noise_for(noises, steps - k)).prev_sample
    assert float((ours - x).norm() / x.norm()) < 1e-6  # diffusers computes the variance in float32


WEIGHT_CASES = [
    (spec, "sd-trailing", steps)
    for spec in ("ddim", "dpmpp2m", "dpmpp2m[order=1]", "flow-euler[shift=3]")
    for steps in (1, 4, 20)
] + [
    # DDIM's steps land beside the grid points: linspace spacing, and trailing with N not dividing T
    ("ddim", "linear-linspace", 4),
    ("ddim", "linear-linspace", 25),
    ("ddim", "sd-trailing", 16),
    ("ddim", "linear-trailing", 16),
    ("dpmpp2m", "linear-linspace", 16),
]


def _linear_trailing():
    return dict(VP_CONFIGS["linear-linspace"], timestep_spacing="trailing", set_alpha_to_one=False)


@pytest.mark.parametrize(
    "spec,config,steps,eta",
    [case + (eta,) for case in WEIGHT_CASES for eta in ((0.0, 0.8) if case[0] == "ddim" else (0.0,))],
)
def test_linear_weights_equal_autograd(spec, config, steps, eta):
    """x_0 = W_x x_N + sum_i W_i out_i (+ injected noise): the weights SDO and the latent path use,
    against autograd through the step rule with every model output a free leaf, on every spacing
    (DDIM's steps from t to t - T // N land beside the next grid point on linspace spacing and on
    trailing spacing with N not dividing T: the weights are still the step rule's)."""
    table = _linear_trailing() if config == "linear-trailing" else VP_CONFIGS[config]
    schedule = make_sampler(spec).schedule(table, steps, eta)
    generator = torch.Generator().manual_seed(steps)
    x_start = torch.full((1,), 0.7, dtype=torch.float64, requires_grad=True)
    outs = [torch.randn(1, generator=generator, dtype=torch.float64).requires_grad_(True) for _ in range(steps)]
    noises = [torch.randn(1, generator=generator, dtype=torch.float64) for _ in range(steps)] if eta else None
    state = schedule.start(x_start)
    for i in range(steps, 0, -1):
        state = schedule.advance(state, i, outs[steps - i], noise_for(noises, i))
    grads = torch.autograd.grad(state[0].sum(), [x_start, *outs])
    assert float(grads[0]) == pytest.approx(schedule.state_weight, rel=1e-12)
    for i in range(steps, 0, -1):
        assert float(grads[steps - i + 1]) == pytest.approx(schedule.output_weight(i), rel=1e-12, abs=1e-15)
    if eta == 0:
        affine = schedule.state_weight * x_start + sum(
            schedule.output_weight(i) * outs[steps - i] for i in range(steps, 0, -1)
        )
        assert float(affine.detach()) == pytest.approx(float(state[0].detach()), rel=1e-12)  # no constant term


@pytest.mark.parametrize(
    "config,steps,step_rule",
    [("linear-linspace-default", 4, 61.00109055143243), ("linear-trailing", 16, 151.5375761659998)],
)
def test_ddim_weights_are_the_step_rule_where_steps_land_beside_the_grid(config, steps, step_rule):
    """The conformance issue's numbers: the ODE view's W_x = alpha_0 / alpha_N (157.40 with
    diffusers' default linear betas) is not what the step rule applies when the steps land beside
    the grid points (999 -> 749 with 666 the next point at N = 4 on linspace spacing)."""
    table = (
        _linear_trailing()
        if config == "linear-trailing"
        else dict(VP_CONFIGS["linear-linspace"], set_alpha_to_one=False)
    )
    schedule = make_sampler("ddim").schedule(table, steps)
    assert schedule.alpha(0) / schedule.alpha(steps) == pytest.approx(157.40257378, rel=1e-9)
    assert schedule.state_weight == pytest.approx(step_rule, rel=1e-12)
    product = 1.0
    for i in range(steps, 0, -1):
        product *= schedule.coefficients(i)[0]
    assert schedule.state_weight == pytest.approx(product, rel=1e-14)


@pytest.mark.parametrize(
    "change,key",
    [
        (dict(clip_sample=True), "clip_sample"),
        (dict(clip_sample=None), "clip_sample"),  # absent: DDIMScheduler's True
        (dict(thresholding=True), "thresholding"),
    ],
)
def test_ddim_refuses_steps_it_cannot_take(change, key):
    """DDIMScheduler's clipping and thresholding of the x_0 prediction are not affine: the chain
    cannot reproduce them. The sampler says so in one line that says what to do (a task's preflight
    refuses the model with it, below); a schedule built from such a configuration in code takes the
    unclipped step and warns."""
    config = {k: v for k, v in {**VP_CONFIGS["sd-trailing"], **change}.items() if v is not None}
    message = make_sampler("ddim").config_problem(config)
    assert f"{key}=True" in message and "\n" not in message
    assert f"set {key} false in the model's scheduler_config.json" in message
    for build in (
        lambda: make_sampler("ddim").schedule(config, 4),
        lambda: make_sampler("ddim").schedule(config, 4, eta=1.0),
    ):
        with pytest.warns(UserWarning, match=f"{key}=True.*takes the step without it"):
            build()
    from bench.chain import Schedule

    with pytest.warns(UserWarning, match=f"{key}=True"):
        Schedule.from_scheduler(make_sampler("ddim").scheduler(config), 4)
    assert make_sampler("ddim").config_problem({**config, key: False}) is None or key == "thresholding"
    # DPM-Solver++ has no clip_sample; its own refusal of thresholding is older
    if key == "clip_sample":
        make_sampler("dpmpp2m").schedule(config, 4)


@pytest.mark.parametrize("spec", ["toy", "toy[sampler=dpmpp2m]", "digits", "sd[model=tiny]"])
def test_the_tasks_configs_state_that_they_do_not_clip(spec):
    """Every built-in task's scheduler configuration says clip_sample=False (an absent key would be
    DDIMScheduler's default, True, and refused): its preflight and schedules go through."""
    task = TASKS.create(spec)
    task.preflight()
    config = task.scheduler_config()
    assert config["clip_sample"] is False and not config.get("thresholding", False)
    assert task.make_schedule(4).num_steps == 4


def test_a_clipping_model_is_refused_by_the_tasks_preflight(tmp_path):
    """sd with a scheduler_config.json that clips: refused in preflight, before any set-up."""
    import json
    import shutil

    from tasks.sd.task import resolve_model

    model = tmp_path / "clipping-sd"
    shutil.copytree(resolve_model("tiny"), model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": True}))
    with pytest.raises(SpecError, match=r"clip_sample=True .*set clip_sample false") as caught:
        TASKS.create(f"sd[model={model}]").preflight()
    assert str(caught.value).startswith(f"sd[model={model}]: ") and "\n" not in str(caught.value)
    TASKS.create(f"sd[model={model},sampler=dpmpp2m]").preflight()  # DPM-Solver++ does not clip


TOYS = [
    "toy",
    "toy[sampler=dpmpp2m]",
    "toy[sampler=flow-euler]",
    "toy[sampler=flow-euler[shift=3]]",
    "toy[sampler=dpmpp2m,spacing=linspace]",
]


@pytest.fixture(scope="module")
def toys():
    built = {}
    for spec in TOYS:
        built[spec] = TASKS.create(spec)
        built[spec].setup(torch.device("cpu"))
    return built


def gradient(task, spec: str, target: str, steps: int) -> torch.Tensor:
    problem = task.make_problem(target, steps, 0)
    ESTIMATORS.create(spec)(problem, random.Random(0))
    return problem.flat_grad()


@pytest.mark.parametrize("toy", TOYS)
@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_full_and_checkpoint_are_exact_on_every_sampler(toys, toy, target):
    exact = gradient(toys[toy], "full", target, 12)
    assert float(exact.norm()) > 0
    for spec in ("checkpoint", "checkpoint[segment=5]", "checkpoint[recursive=true]"):
        grad = gradient(toys[toy], spec, target, 12)
        assert float((grad - exact).norm() / exact.norm()) < 1e-10, spec


@pytest.mark.parametrize("toy", TOYS[:3])
def test_full_equals_autograd_through_the_diffusers_step_loop(toys, toy):
    """An independent exact gradient: backprop through diffusers' own scheduler steps."""
    task, steps = toys[toy], 8
    problem = task.make_problem("latent", steps, 0)
    ESTIMATORS.create("full")(problem, random.Random(0))
    ours = problem.flat_grad()
    sampler = task.chosen_sampler()
    reference = sampler.scheduler(task.scheduler_config())
    reference.set_timesteps(steps)
    x_start = task.make_problem("latent", steps, 0).x_start
    x = x_start
    for t in reference.timesteps:
        out = problem.chain.denoiser(x, torch.full((x.shape[0],), float(t), dtype=x.dtype), problem.cond)
        x = reference.step(out, t, x).prev_sample
    (theirs,) = torch.autograd.grad(-task.reward_of(x).mean(), x_start)
    # diffusers' coefficients are float32 (DDIM: 3e-8 here); it runs DPM-Solver and flow steps in float32
    tolerance = 1e-6 if sampler.name == "ddim" else 1e-5
    assert float((ours - theirs.reshape(-1)).norm() / theirs.norm()) < tolerance


@pytest.mark.parametrize("toy", TOYS[:3])
@pytest.mark.parametrize("target", ["latent", "cond"])
def test_adjoint_converges_to_the_chain_gradient_on_every_sampler(toys, toy, target):
    errors = []
    for steps in (10, 20, 50, 100):  # dividing T: DDIM's trailing grid lands on its own points
        exact = gradient(toys[toy], "full", target, steps)
        errors.append(float((gradient(toys[toy], "adjoint", target, steps) - exact).norm() / exact.norm()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] / errors[-1] > 10**0.7, errors  # about first order over 10x the steps


BUILT_IN = (
    "full",
    "checkpoint",
    "adjoint",
    "sdo",
    "truncated",
    "draft-lv",
    "zeroth-order",
    "score-function",
    "dno",
    "edict",
    "torchdiffeq-adjoint",
    "coarse-adjoint",
)


def test_every_estimator_runs_or_says_why_not_on_every_sampler(toys):
    for toy in TOYS[:3]:
        for name in BUILT_IN:
            estimator = ESTIMATORS.create(name)
            for target in ("latent", "cond", "weights"):
                problem = toys[toy].make_problem(target, 6, 0)
                reason = estimator.skip_reason(problem)
                if reason:
                    assert isinstance(reason, str) and reason.strip()
                    continue
                estimator(problem, random.Random(0))
                assert torch.isfinite(problem.flat_grad()).all(), (toy, name, target)


def test_sdo_identity_path_follows_each_sampler(toys):
    """sdo[step=first] on the latent is the exact gradient of x_0 = W_x x_N + W_N out_N(x_N) + const:
    checked against autograd through that map, where W's come from the step rule."""
    for toy in TOYS[:3]:
        task = toys[toy]
        problem = task.make_problem("latent", 6, 0)
        ESTIMATORS.create("sdo")(problem, random.Random(0))
        schedule = problem.chain.schedule
        fresh = task.make_problem("latent", 6, 0)
        x0 = fresh.chain.sample(fresh.x_start, fresh.cond)
        out = fresh.chain.eps(fresh.x_start, 6, fresh.cond)
        surrogate = (
            x0
            + schedule.state_weight * (fresh.x_start - fresh.x_start.detach())
            + schedule.output_weight(6) * (out - out.detach())
        )
        (expected,) = torch.autograd.grad(-task.reward_of(surrogate).mean(), fresh.x_start)
        torch.testing.assert_close(problem.flat_grad(), expected.reshape(-1), rtol=1e-12, atol=1e-14)


def test_the_sampler_is_recorded_and_canonical():
    task = TASKS.create("toy[sampler=dpm-solver[order=1]]")
    assert task.spec == "toy[sampler=dpmpp2m[order=1]]"
    task.setup(torch.device("cpu"))
    assert task.make_problem("latent", 3, 0).chain.schedule.sampler == "dpmpp2m[order=1]"
    assert {"ddim", "dpmpp2m", "flow-euler"} <= set(SAMPLERS.names())


@pytest.mark.parametrize(
    "spec,message",
    [
        ("toy[sampler=nope]", "unknown sampler 'nope'; valid: ddim, dpmpp2m, flow-euler"),
        ("toy[sampler=dpmpp2m[order=3]]", "option order='3' is not one of 1, 2"),
        ("toy[sampler=flow-euler[eta=1]]", "flow-euler: unknown option 'eta'"),
        ("toy[sampler=dpmpp2m,eta=0.5]", "eta=0.5 needs a stochastic sampler"),
    ],
)
def test_bad_sampler_specs_are_one_line_errors(spec, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("(", r"\(")):
        TASKS.create(spec).preflight()


@pytest.mark.parametrize(
    "spec,message",
    [
        ("digits[model=flow,sampler=ddim]", "sampler ddim needs a model with epsilon output"),
        ("digits[sampler=flow-euler]", "sampler flow-euler needs a model with flow output"),
    ],
)
def test_a_sampler_the_model_cannot_drive_is_a_one_line_error(spec, message):
    with pytest.raises(SpecError, match=message):
        TASKS.create(spec).preflight()


def test_coarse_adjoint_is_exact_at_full_budget_and_improves_with_it(toys):
    for toy in TOYS[:3]:
        for target in ("latent", "cond", "weights"):
            exact = gradient(toys[toy], "full", target, 20)
            errors = [
                float((gradient(toys[toy], f"coarse-adjoint[budget={b}]", target, 20) - exact).norm() / exact.norm())
                for b in (0.25, 0.5, 1)
            ]
            assert errors[0] > errors[1] > errors[2], (toy, target, errors)
            if "dpmpp2m" not in toy:  # Euler samplers: the coarse rule at k = 1 is their exact adjoint
                assert errors[2] < 1e-12, (toy, target, errors)
