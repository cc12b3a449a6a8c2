"""Everything a plug-in (an estimator or a task in its own file) imports, from one module:

    from bench.api import Estimator, Estimate, Cost, Option, register_estimator, backprop, ...

The names below are the public contract; the modules they live in may move, this list will not
shrink without notice. A file given to `--include` is executed (imported) by the sweep, and again
by its memory-measuring process: include only code you trust."""

from bench.chain import CallCounter, Chain, Schedule, noise_for
from bench.errors import Diverged, SkipCell, SpecError
from bench.options import Option, at_least
from bench.problem import TARGETS, Problem
from bench.registry import register_estimator, register_task
from estimators.base import Cost, Estimate, Estimator, backprop, require_graph, write_gradients
from estimators.masked_chain import run_masked_chain
from estimators.randomness import torch_generator
from tasks.base import Task

__all__ = [
    # the estimator contract
    "Estimator",
    "Estimate",
    "Cost",
    "backprop",
    "require_graph",
    "write_gradients",
    "register_estimator",
    # options and errors
    "Option",
    "at_least",
    "SpecError",
    "SkipCell",
    "Diverged",
    # the problem and its chain
    "Problem",
    "TARGETS",
    "Chain",
    "Schedule",
    "CallCounter",
    "noise_for",
    "run_masked_chain",
    # seeded randomness
    "torch_generator",
    # the task contract
    "Task",
    "register_task",
]
