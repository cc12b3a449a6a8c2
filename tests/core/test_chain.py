"""The pure DDIM step against diffusers' DDIMScheduler.step, and the schedule's bookkeeping."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from bench.chain import Schedule, alpha_bar_at_time
from bench.errors import SpecError

CONFIGS = {
    "sd-leading": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    ),
    "linear-trailing": dict(beta_schedule="linear", set_alpha_to_one=True, timestep_spacing="trailing"),
    "cosine-linspace": dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False, timestep_spacing="linspace"),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 7, 10, 30, 50])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_step_equals_diffusers_ddim(config, steps, eta):
    scheduler = DDIMScheduler(clip_sample=False, **CONFIGS[config])
    schedule = Schedule.from_scheduler(scheduler, steps, eta=eta)
    reference = DDIMScheduler(clip_sample=False, **CONFIGS[config])
    reference.set_timesteps(steps)
    generator = torch.Generator().manual_seed(steps)
    x = torch.randn(3, 4, generator=generator)
    for i, t in zip(range(steps, 0, -1), reference.timesteps):
        assert schedule.model_time(i) == int(t)
        eps = torch.randn(3, 4, generator=generator)
        noise = torch.randn(3, 4, generator=generator)
        ours = schedule.step(x, i, eps, noise if eta > 0 else None)
        theirs = reference.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)
        x = theirs


def test_step_float64_is_exact_to_rounding():
    scheduler = DDIMScheduler(clip_sample=False, **CONFIGS["sd-leading"])
    schedule = Schedule.from_scheduler(scheduler, 20)
    x, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    i = 13
    ab, ab_prev = schedule.alpha_bar[i], schedule.alpha_bar[i - 1]
    pred_x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    expected = math.sqrt(ab_prev) * pred_x0 + math.sqrt(1 - ab_prev) * eps
    torch.testing.assert_close(schedule.step(x, i, eps), expected, rtol=1e-13, atol=1e-13)


def test_eta_zero_step_is_euler_in_rho():
    """y_{i-1} = y_i + (rho_{i-1} - rho_i) eps: DDIM is Euler on the probability-flow ODE."""
    schedule = Schedule.from_scheduler(DDIMScheduler(clip_sample=False, **CONFIGS["sd-leading"]), 10)
    x, eps = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for i in range(10, 0, -1):
        y_next = schedule.step(x, i, eps) / schedule.alpha(i - 1)
        expected = x / schedule.alpha(i) + (schedule.rho(i - 1) - schedule.rho(i)) * eps
        torch.testing.assert_close(y_next, expected, rtol=1e-12, atol=1e-12)
        assert schedule.eps_weight(i) == pytest.approx(schedule.rho(i - 1) - schedule.rho(i), rel=1e-12)


def test_continuous_time_matches_table_at_integers():
    scheduler = DDIMScheduler(clip_sample=False, **CONFIGS["sd-leading"])
    table = scheduler.alphas_cumprod.double()
    t = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar_at_time(t, table), table[t.long()], rtol=1e-12, atol=0)
    schedule = Schedule.from_scheduler(scheduler, 10)
    for i in range(1, 11):
        assert schedule.time_at_rho(schedule.rho(i)) == pytest.approx(schedule.model_time(i), abs=1e-6)
    assert schedule.model_time(0) == 0.0  # the clean end of an SD grid is t = 0


def test_schedule_rejects_bad_input():
    scheduler = DDIMScheduler(clip_sample=False)
    with pytest.raises(SpecError, match="positive integer"):
        Schedule.from_scheduler(scheduler, -3)
    with pytest.raises(SpecError, match="exceeds"):
        Schedule.from_scheduler(scheduler, 5000)
    with pytest.raises(SpecError, match="prediction_type"):
        Schedule.from_scheduler(DDIMScheduler(prediction_type="v_prediction"), 10)


def test_step_with_eta_needs_noise():
    schedule = Schedule.from_scheduler(DDIMScheduler(clip_sample=False), 10, eta=1.0)
    with pytest.raises(ValueError, match="injected noise"):
        schedule.step(torch.zeros(2), 5, torch.zeros(2))
