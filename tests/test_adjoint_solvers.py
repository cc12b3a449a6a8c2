"""The adjoint's solvers (estimators/adjoint.py) converge at their declared order: with the
forward chain fixed (N = 10), the error of the gradient against a converged reference (Heun at
4096 steps) falls like M^-p in the adjoint's step count M; the least-squares slope over
M = 64..512 must be within 0.3 of the declared p, on every sampler."""
import math
import random

import pytest
import torch

from bench.registry import ESTIMATORS, TASKS
from estimators.adjoint import SOLVERS

STEPS = (64, 128, 256, 512)


@pytest.fixture(scope="module")
def toys():
    built = {}
    for spec in ("toy", "toy[sampler=dpmpp2m]", "toy[sampler=flow-euler]"):
        built[spec] = TASKS.create(spec)
        built[spec].setup(torch.device("cpu"))
    return built


def gradient(task, spec: str, target: str) -> torch.Tensor:
    problem = task.make_problem(target, 10, 0)
    ESTIMATORS.create(spec)(problem, random.Random(0))
    return problem.flat_grad()


def slope(steps, errors) -> float:
    xs, ys = [math.log(m) for m in steps], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize("toy,target", [("toy", "latent"), ("toy", "cond"), ("toy[sampler=dpmpp2m]", "cond"),
                                         ("toy[sampler=flow-euler]", "latent")])
def test_each_solver_converges_at_its_declared_order(toys, toy, target):
    reference = gradient(toys[toy], "adjoint[solver=heun,steps=4096]", target)
    for solver in SOLVERS:
        estimator = ESTIMATORS.create(f"adjoint[solver={solver}]")
        errors = [float((gradient(toys[toy], f"adjoint[solver={solver},steps={m}]", target) - reference).norm()
                        / reference.norm()) for m in STEPS]
        measured = slope(STEPS, errors)
        assert abs(measured - estimator.solver_order) <= 0.3, (solver, measured, errors)


def test_the_cost_model_counts_each_solvers_stages(toys):
    for solver, (_, stages) in SOLVERS.items():
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
