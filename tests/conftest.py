import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental hub call fails at once

from bench import registry  # noqa: E402
from bench.registry import ESTIMATORS, TASKS  # noqa: E402
from bench.rewards import REWARDS  # noqa: E402
from bench.samplers import SAMPLERS  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registries_scoped_to_the_test_file():
    """What a test file registers (an --include, a decorated class) is gone after it: no plug-in
    of one file leaks into another's listings or skip reasons."""
    for name in list(TASKS.names()):  # the built-in tasks register their rewards on import: not a file's
        TASKS.get(name)
    saved = [(r, dict(r._entries), dict(r._aliases)) for r in (ESTIMATORS, TASKS, SAMPLERS) if r.names()]
    included = dict(registry._INCLUDED)
    with REWARDS.scoped():
        yield
    for r, entries, aliases in saved:
        loaded = {name: r._entries[name] for name in entries if not isinstance(r._entries.get(name), str)}
        r._entries.clear()
        r._entries.update({**entries, **loaded})  # keep classes loaded since (lazy entries resolved)
        r._aliases.clear()
        r._aliases.update(aliases)
    registry._INCLUDED.clear()
    registry._INCLUDED.update(included)


@pytest.fixture(scope="module")
def pipeline_cache(tmp_path_factory):
    """A fresh cache folder (DIFFGRAD_BENCH_CACHE) for one module: the tiny pipelines and CLIPs it
    uses are built there, never in the user's cache; the variable is restored afterwards."""
    folder = tmp_path_factory.mktemp("pipeline-cache")
    old = os.environ.get("DIFFGRAD_BENCH_CACHE")
    os.environ["DIFFGRAD_BENCH_CACHE"] = str(folder)
    yield folder
    if old is None:
        del os.environ["DIFFGRAD_BENCH_CACHE"]
    else:
        os.environ["DIFFGRAD_BENCH_CACHE"] = old


@pytest.fixture(scope="session")
def toy():
    task = TASKS.create("toy")
    task.setup(torch.device("cpu"))
    return task


@pytest.fixture(scope="session")
def toy_eta():
    task = TASKS.create("toy[eta=0.6]")
    task.setup(torch.device("cpu"))
    return task


# The estimator set every pipeline task's sweep runs (the issue's and the docs' list)
PIPELINE_ESTIMATORS = ["full", "checkpoint", "adjoint", "sdo", "truncated[k=2]"]


def sweep_rows(task_spec, folder, estimators=PIPELINE_ESTIMATORS, steps=2):
    """Rows of a sweep of `estimators` on latent, cond and weights at N = `steps`, no optimisation,
    one round, no memory: one row per cell, each ok or skipped with its reason."""
    from bench.run.runner import SweepSpec, run_sweep

    spec = SweepSpec(
        tasks=[task_spec],
        estimators=list(estimators),
        targets=["latent", "cond", "weights"],
        steps=[steps],
        iters=0,
        rounds=1,
        memory="off",
    )
    rows = run_sweep(spec, folder)
    assert len(rows) == 3 * len(estimators)
    for row in rows:
        assert row["status"] == "ok" or (row["status"] == "skipped" and row["reason"]), row
    return rows


def gradient(task, spec, target, steps, seed=0, rng_seed=0):
    """(flat gradient, problem) of estimator `spec` on a fresh problem."""
    problem = task.make_problem(target, steps, seed)
    ESTIMATORS.create(spec)(problem, random.Random(rng_seed))
    return problem.flat_grad().detach().clone(), problem


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))
