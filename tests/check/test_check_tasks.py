"""The task conformance suite (bench/check/tasks.py): the cheap built-in task specs pass it (known
defects marked strictly, so a fix shows), and it catches broken plug-ins: problems that share
leaves, an extra tensor among the leaves, a parameter left trainable outside them."""

import pytest
import torch

from bench.check import Check
from bench.check.tasks import TASK_CHECKS, check_all_tasks, check_task, print_task_checks
from bench.registry import TASKS
from tasks.toy import Toy

CHEAP = [
    "toy[d=2,batch=2]",
    "toy[d=2,batch=2,eta=1.0]",
    "toy[d=2,batch=2,sampler=flow-euler]",
    "toy[d=2,batch=2,sampler=dpmpp2m,spacing=leading]",
    "digits[batch=2,fid_samples=8]",
    "sd[model=tiny]",
]
KNOWN: dict[tuple[str, str], str] = {}  # strict expected failures of the built-in tasks: none left


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Check]]:
    return {spec: {check.name: check for check in check_task(spec)} for spec in CHEAP}


@pytest.mark.parametrize(
    "spec,name",
    [
        pytest.param(
            spec,
            name,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN[(spec, name)])] if (spec, name) in KNOWN else [],
            id=f"{spec}-{name}",
        )
        for spec in CHEAP
        for name in TASK_CHECKS
    ],
)
def test_the_cheap_tasks_pass(results, spec, name):
    check = results[spec][name]
    assert check.status == "pass", f"{spec}: {name}: {check.detail}"


def test_each_check_covers_the_targets_the_options_build(results):
    assert "noise n/a (target 'noise' needs a stochastic sampler" in results["toy[d=2,batch=2]"]["set-up"].detail
    assert "noise: 3 leaves apart" in results["toy[d=2,batch=2,eta=1.0]"]["fresh problems per call"].detail
    digits = results["digits[batch=2,fid_samples=8]"]
    assert "gates: 1 leaves" in digits["the target's leaves and nothing else"].detail  # a task's own target
    assert "images (2, 1, 8, 8)" in digits["images and rewards in range"].detail
    assert "images (2, 3, 32, 32)" in results["sd[model=tiny]"]["images and rewards in range"].detail
    assert results["toy[d=2,batch=2]"]["stable data fingerprint"].detail == "'' (no data files)"


def test_sds_dtype_option_names_the_networks_precision_not_the_runs():
    """sd[dtype=fp16]: the option keeps its name and spec, the frozen networks' precision is
    network_dtype, and Task.dtype stays the estimators' (the leaves', float32)."""
    task = TASKS.create("sd[dtype=fp16]")
    assert task.spec == "sd[dtype=fp16]" and task.values["dtype"] == "fp16"
    assert task.dtype is torch.float32 and task.network_dtype is torch.float16
    assert TASKS.create("sd").network_dtype is torch.float32


# -- broken plug-ins ----------------------------------------------------------------------------
class SharedToy(Toy):
    name = "test-toy-shared"
    summary = "the toy, handing out one problem per (target, N, seed) again and again"

    def make_problem(self, target, steps, seed, dtype=None):
        made = self.__dict__.setdefault("_made", {})
        key = (target, steps, seed, dtype)
        if key not in made:
            made[key] = super().make_problem(target, steps, seed, dtype)
        return made[key]


class ExtraLeafToy(Toy):
    name = "test-toy-extra-leaf"
    summary = "the toy, with a tensor of its own among every target's leaves"

    def leaves_for(self, target, x_start, cond, noises, denoiser):
        return super().leaves_for(target, x_start, cond, noises, denoiser) + [
            torch.zeros(3, dtype=x_start.dtype, requires_grad=True)
        ]


class TrainableToy(Toy):
    name = "test-toy-trainable"
    summary = "the toy, leaving its model's means trainable for every target"

    def make_problem(self, target, steps, seed, dtype=None):
        problem = super().make_problem(target, steps, seed, dtype)
        problem.chain.denoiser.means.requires_grad_(True)
        return problem


@pytest.fixture
def broken():
    added = [TASKS.register(cls) for cls in (SharedToy, ExtraLeafToy, TrainableToy)]
    yield
    for cls in added:
        TASKS._entries.pop(cls.name, None)


def _checks(spec: str) -> dict[str, Check]:
    return {check.name: check for check in check_task(spec, targets=["latent", "cond"])}


def test_problems_that_share_leaves_fail_freshness(broken):
    checks = _checks("test-toy-shared[d=2,batch=2]")
    fresh = checks["fresh problems per call"]
    assert fresh.status == "fail" and "share leaf object" in fresh.detail, fresh.detail
    assert checks["the target's leaves and nothing else"].status == "pass"


def test_an_extra_leaf_fails_the_leaves_check(broken):
    checks = _checks("test-toy-extra-leaf[d=2,batch=2]")
    leaves = checks["the target's leaves and nothing else"]
    assert leaves.status == "fail" and "1 other tensor(s) among them" in leaves.detail, leaves.detail
    assert checks["fresh problems per call"].status == "pass"


def test_a_parameter_left_trainable_fails_the_leaves_check(broken):
    leaves = _checks("test-toy-trainable[d=2,batch=2]")["the target's leaves and nothing else"]
    assert leaves.status == "fail" and "denoiser parameter means" in leaves.detail, leaves.detail


def test_the_broken_plugins_are_gone_after_the_test():
    assert not {"test-toy-shared", "test-toy-extra-leaf", "test-toy-trainable"} & set(TASKS.names())


def test_a_task_that_cannot_set_up_fails_one_row_and_skips_the_rest():
    checks = check_task("digits[models=/nonexistent/folder]")
    assert [c.status for c in checks] == ["fail"] + ["n/a"] * (len(TASK_CHECKS) - 1)
    assert "not a folder of digits models" in checks[0].detail


def test_check_all_and_print():
    from rich.console import Console

    checks = check_all_tasks(["toy[d=1,batch=2]"])
    assert [c.name for c in checks] == list(TASK_CHECKS)
    console = Console(record=True, width=200)
    print_task_checks(checks, console)
    assert "all checks pass" in console.export_text()
