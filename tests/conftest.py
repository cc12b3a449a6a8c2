import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental hub call fails at once

from bench.registry import ESTIMATORS, TASKS  # noqa: E402


@pytest.fixture(scope="session")
def toy():
    task = TASKS.create("toy")
    task.setup(torch.device("cpu"))
    return task


def gradient(task, spec, target, steps, seed=0, rng_seed=0):
    """(flat gradient, problem) of estimator `spec` on a fresh problem."""
    problem = task.make_problem(target, steps, seed)
    ESTIMATORS.create(spec)(problem, random.Random(rng_seed))
    return problem.flat_grad().detach().clone(), problem


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))
