"""The sampler conformance suite (bench/check/samplers.py): every registered sampler and its
variants pass it (the known defects of built-in samplers are marked, strictly, so a fix shows),
and it catches broken plug-ins: a step off by 1e-4, weights that lie."""

from dataclasses import dataclass

import pytest

from bench.check import Check
from bench.check.samplers import (
    SAMPLER_CHECKS,
    check_all_samplers,
    check_sampler,
    print_sampler_checks,
    sampler_variants,
)
from bench.samplers import SAMPLERS
from bench.samplers.ddim import DDIM, DDIMSchedule
from bench.samplers.flow_euler import FlowEuler, FlowEulerSchedule

BUILT_IN = [name for name in SAMPLERS.names() if SAMPLERS.get(name).__module__.startswith("bench.samplers.")]
SPECS = [variant for name in BUILT_IN for variant in sampler_variants(name)]

# What the suite finds in the built-in samplers today (report of the conformance issue): strict
# expected failures, so that a fix shows. None left: DDIM's weights are the step rule's, its ODE
# grid at N = 1 inside the clamped model time is uniform in rho, clip_sample and thresholding are
# refused.
KNOWN: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Check]]:
    return {spec: {check.name: check for check in check_sampler(spec)} for spec in SPECS}


def test_the_variants_come_from_the_options():
    assert sampler_variants("dpmpp2m") == ["dpmpp2m", "dpmpp2m[order=1]", "dpmpp2m[lower_order_final=false]"]
    assert sampler_variants("flow-euler") == ["flow-euler", "flow-euler[shift=3]"]  # EXTRA_VARIANTS
    assert {"ddim", "dpmpp2m[order=1]", "flow-euler[shift=3]"} <= set(SPECS)
    assert sampler_variants("dpmpp2m[order=1]") == ["dpmpp2m[order=1]"]


@pytest.mark.parametrize(
    "spec,name",
    [
        pytest.param(
            spec,
            name,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN[(spec, name)])] if (spec, name) in KNOWN else [],
            id=f"{spec}-{name}",
        )
        for spec in SPECS
        for name in SAMPLER_CHECKS
    ],
)
def test_every_registered_sampler_passes(results, spec, name):
    check = results[spec][name]
    assert check.status in ("pass", "n/a"), f"{spec}: {name}: {check.detail}"
    if check.status == "n/a":
        assert name == "trajectory with injected noise" and spec != "ddim"


def test_each_check_measures_what_it_says(results):
    ddim = results["ddim"]
    assert "11 table(s)" in ddim["trajectory = the diffusers step loop"].detail
    assert ddim["trajectory with injected noise"].status == "pass"
    assert "identity steps at linear leading offset=0" in ddim["identity steps"].detail
    assert ddim["unsupported configurations refused"].detail.startswith(
        "refused: clip_sample, thresholding, v_prediction, sample prediction"
    )
    assert "88 (table, N, eta)" in ddim["linear weights = autograd"].detail  # linspace grids too
    assert results["dpmpp2m"]["unsupported configurations refused"].detail.startswith(
        "refused: thresholding, v_prediction, sample prediction, karras sigmas"
    )
    assert (
        "7 table(s)" in results["dpmpp2m"]["trajectory = the diffusers step loop"].detail
    )  # set_alpha_to_one: no DPM key
    assert "2 table(s)" in results["flow-euler"]["trajectory = the diffusers step loop"].detail


# -- broken plug-ins ----------------------------------------------------------------------------
class OffSchedule(DDIMSchedule):
    def coefficients(self, i):
        a, b, s = super().coefficients(i)
        return a, b * (1 + 1e-4), s  # the epsilon coefficient off by 1e-4


class OffDDIM(DDIM):
    name = "test-ddim-off"
    summary = "DDIM with its epsilon coefficient off by 1e-4"

    def schedule_from(self, scheduler, steps, eta):
        return OffSchedule.read(scheduler, steps, eta)


class LyingSchedule(DDIMSchedule):
    def output_weight(self, i):
        weight = super().output_weight(i)
        return weight * (1 + 1e-6) if i == self.num_steps else weight


class LyingDDIM(DDIM):
    name = "test-ddim-lying"
    summary = "DDIM whose output_weight(N) is 1e-6 off its step rule"

    def schedule_from(self, scheduler, steps, eta):
        return LyingSchedule.read(scheduler, steps, eta)


@dataclass(frozen=True)
class RememberingSchedule(FlowEulerSchedule):
    def advance(self, state, i, out, noise=None):  # a step that remembers the previous call's output
        last = self.__dict__.setdefault("_last", [out])
        used = 0.5 * (out + last[0])
        last[0] = out
        return (state[0] + (self.sigmas[i - 1] - self.sigmas[i]) * used,)


class RememberingFlow(FlowEuler):
    name = "test-flow-remembering"
    summary = "flow Euler with hidden state in its step"

    def schedule_from(self, scheduler, steps, eta):
        plain = super().schedule_from(scheduler, steps, eta)
        return RememberingSchedule(plain.timesteps, plain.sigmas, plain.train_timesteps)


@pytest.fixture
def broken():
    added = [SAMPLERS.register(cls) for cls in (OffDDIM, LyingDDIM, RememberingFlow)]
    yield
    for cls in added:
        SAMPLERS._entries.pop(cls.name, None)


def _statuses(spec, **narrow):
    return {check.name: check for check in check_sampler(spec, **narrow)}


def test_a_step_off_by_1e4_fails_the_trajectory(broken):
    checks = _statuses(
        "test-ddim-off", steps=(4, 10), tables=["sd trailing", "linear leading offset=1 alpha_to_one=true"]
    )
    trajectory = checks["trajectory = the diffusers step loop"]
    assert trajectory.status == "fail" and "rel. distance" in trajectory.detail, trajectory.detail
    assert checks["trajectory with injected noise"].status == "fail"
    assert checks["linear weights = autograd"].status == "pass"  # its weights follow its (wrong) step


def test_weights_that_lie_fail_the_weights_check(broken):
    checks = _statuses("test-ddim-lying", steps=(4, 10), tables=["sd trailing"])
    weights = checks["linear weights = autograd"]
    assert weights.status == "fail" and "output_weight(4)" in weights.detail, weights.detail
    assert checks["trajectory = the diffusers step loop"].status == "pass"


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # its remembered output
def test_a_step_with_hidden_state_fails_purity(broken):
    checks = _statuses("test-flow-remembering", steps=(4,))
    assert checks["pure steps"].status == "fail", checks["pure steps"].detail
    assert checks["trajectory = the diffusers step loop"].status == "fail"


def test_the_broken_plugins_are_gone_after_the_test():
    assert not {"test-ddim-off", "test-ddim-lying", "test-flow-remembering"} & set(SAMPLERS.names())


def test_check_all_runs_the_variants_and_prints():
    from rich.console import Console

    checks = check_all_samplers(["flow-euler"])
    assert {c.spec for c in checks} == {"flow-euler", "flow-euler[shift=3]"}
    assert [c.name for c in checks[: len(SAMPLER_CHECKS)]] == list(SAMPLER_CHECKS)
    console = Console(record=True, width=200)
    print_sampler_checks(checks, console)
    assert "all checks pass" in console.export_text()
