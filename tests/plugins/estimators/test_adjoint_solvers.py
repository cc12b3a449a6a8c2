"""The adjoint's solvers (estimators/adjoint_solvers.py) converge at their declared order: with
the forward chain fixed (N = 10), the error of the gradient against a converged reference (Heun at
4096 steps) falls like M^-p in the adjoint's step count M; the least-squares slope over
M = 64..512 must be within 0.3 of the declared p, on every sampler. A solver added as a class,
here a midpoint rule registered for one test, is driven by the same loop."""

import dataclasses
import inspect
import math
import random

import pytest
import torch

from bench.registry import ESTIMATORS, TASKS
from estimators.adjoint import Adjoint
from estimators.adjoint_solvers import SOLVERS, AdjointSolver, Interval, moved

STEPS = (64, 128, 256, 512)


@pytest.fixture(scope="module")
def toys():
    built = {}
    for spec in ("toy", "toy[sampler=dpmpp2m]", "toy[sampler=flow-euler]"):
        built[spec] = TASKS.create(spec)
        built[spec].setup(torch.device("cpu"))
    return built


@pytest.fixture(scope="module")
def reference(toys):
    """The converged gradient (Heun at 4096 steps) per (toy, target), computed once per module."""
    computed = {}

    def get(toy: str, target: str) -> torch.Tensor:
        if (toy, target) not in computed:
            computed[toy, target] = gradient(toys[toy], "adjoint[solver=heun,steps=4096]", target)
        return computed[toy, target]

    return get


def gradient(task, spec: str, target: str) -> torch.Tensor:
    problem = task.make_problem(target, 10, 0)
    ESTIMATORS.create(spec)(problem, random.Random(0))
    return problem.flat_grad()


def slope(steps, errors) -> float:
    xs, ys = [math.log(m) for m in steps], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize(
    "toy,target",
    [("toy", "latent"), ("toy", "cond"), ("toy[sampler=dpmpp2m]", "cond"), ("toy[sampler=flow-euler]", "latent")],
)
def test_each_solver_converges_at_its_declared_order(toys, reference, toy, target):
    exact = reference(toy, target)
    for solver in SOLVERS:
        estimator = ESTIMATORS.create(f"adjoint[solver={solver}]")
        errors = [
            float((gradient(toys[toy], f"adjoint[solver={solver},steps={m}]", target) - exact).norm() / exact.norm())
            for m in STEPS
        ]
        measured = slope(STEPS, errors)
        assert abs(measured - estimator.solver_order) <= 0.3, (solver, measured, errors)


def test_the_cost_model_counts_each_solvers_stages(toys):
    for solver, rule in SOLVERS.items():
        stages = rule.stages
        problem = toys["toy"].make_problem("cond", 10, 0)
        estimator = ESTIMATORS.create(f"adjoint[solver={solver},steps=7]")
        estimator(problem, random.Random(0))
        cost = estimator.cost_for(problem)
        start = 1 if solver == "discrete" else 0  # a forward at x_0 starts its recovery of y
        assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (10 + 7 * stages + start, 7 * stages)
        assert (cost.nfe_forward, cost.nfe_vjp) == (10 + 7 * stages + start, 7 * stages)


def test_the_finer_grid_keeps_the_end_points_and_is_uniform_in_lambda(toys):
    schedule = toys["toy"].make_problem("latent", 10, 0).chain.schedule
    grid = schedule.ode_grid(40)
    assert len(grid) == 41 and grid[0] == schedule.ode_point(0) and grid[-1] == schedule.ode_point(10)
    logs = [math.log(s) for s in grid]
    steps = [b - a for a, b in zip(logs, logs[1:])]
    assert max(steps) - min(steps) < 1e-9 * max(steps)
    flow = toys["toy[sampler=flow-euler]"].make_problem("latent", 10, 0).chain.schedule
    grid = flow.ode_grid(40)  # sigma from 0 to 1: fixed end intervals one model-time unit wide
    assert grid[0] == 0.0 and grid[-1] == 1.0 and grid[1] == pytest.approx(1e-3) and grid[-2] == pytest.approx(1 - 1e-3)


class Midpoint(AdjointSolver):
    """The explicit midpoint rule, halfway in s (no built-in solver): order 2 at two VJPs a step,
    Z_b = Z_a + h G(Z_a + (h / 2) G(Z_a, s_a), s_a + h / 2)."""

    name, order, stages, note = "midpoint", 2, 2, "2, halfway in s"

    def step(self, z: list, interval: Interval) -> list:
        h, s = interval.width, interval.start
        k1 = self.flow.rate(z, s, interval.first)
        return moved(z, h, self.flow.rate(moved(z, h / 2, k1), s + h / 2, None))


@pytest.fixture
def midpoint(monkeypatch):
    """Midpoint in the solver table for one test, and in the adjoint's solver choices (which are
    read from the table when estimators/adjoint.py is imported); both undone after the test."""
    monkeypatch.setitem(SOLVERS, Midpoint.name, Midpoint)
    options = tuple(
        dataclasses.replace(opt, choices=tuple(SOLVERS)) if opt.name == "solver" else opt for opt in Adjoint.options
    )
    monkeypatch.setattr(Adjoint, "options", options)
    return Midpoint


def test_a_solver_added_as_a_class_runs_in_the_same_loop_at_its_order(toys, reference, midpoint):
    source = inspect.getsource(Adjoint.estimate)  # the loop names no solver: it steps whichever it is given
    assert not [name for name in SOLVERS if f'"{name}"' in source]
    toy, target = "toy[sampler=dpmpp2m]", "cond"
    exact = reference(toy, target)
    errors = [
        float((gradient(toys[toy], f"adjoint[solver=midpoint,steps={m}]", target) - exact).norm() / exact.norm())
        for m in STEPS
    ]
    estimator = ESTIMATORS.create("adjoint[solver=midpoint]")
    assert estimator.solver_order == 2 and estimator.code_objects() == (Midpoint,)
    assert abs(slope(STEPS, errors) - midpoint.order) <= 0.3, errors
    problem = toys["toy"].make_problem("cond", 10, 0)
    estimator = ESTIMATORS.create("adjoint[solver=midpoint,steps=7]")
    estimator(problem, random.Random(0))
    cost = estimator.cost_for(problem)
    assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (10 + 7 * 2, 7 * 2)
    assert (cost.nfe_forward, cost.nfe_vjp) == (10 + 7 * 2, 7 * 2)


def test_the_midpoint_rule_leaves_the_table_after_its_test():
    assert (
        "midpoint" not in SOLVERS
        and "midpoint" not in dict((opt.name, opt) for opt in Adjoint.options)["solver"].choices
    )
