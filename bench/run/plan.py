"""A sweep's plan: the settings of one part (SweepSpec, declared in bench/run/settings.py), every cell
it expands to (Cell), each with the key that names its row, checked before anything runs
(resolve, expand, plan)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bench.results import store
from bench.errors import SpecError
from bench.run.identity import cell_key, code_hash
from bench.registry import ESTIMATORS, TASKS, include
from bench.run.settings import (
    DEFAULT_ESTIMATORS,
    DEFAULT_STABLE_CAP_S,
    DEFAULT_STEPS,
    DEFAULT_TASK,
    DEFAULT_TIMEOUT_S,
    ISOLATE_MODES,
    MAX_SEED,
    MEMORY_MODES,
    SweepSpec,
    check_spec,
)

# --remeasure: what can be measured again without computing the gradients again, and the row
# fields each replaces (the harness's code is in no cell key: docs/methodology.md, "What a cell's key covers")
REMEASURED: dict[str, Callable[[str], bool]] = {
    "time": lambda name: name.startswith("time_") or name in ("timing_suspect", "threads"),
    "memory": lambda name: name == "peak_mem_bytes" or name.startswith("mem_"),
}
IDENTITY_FIELDS = ("key", "options", "phase_s", "cell_seconds", "finished", "job", "remeasured")


@dataclass
class Cell:
    task: Any
    estimator: Any
    target: str
    steps: int
    seed: int
    key: str
    identity: dict[str, Any]

    @property
    def point(self) -> tuple:
        return (self.task.spec, self.target, self.steps, self.seed)

    def row(self, **fields: Any) -> dict[str, Any]:
        """A row of this cell: its key, identity and options, then `fields`."""
        return {"key": self.key, **self.identity, "options": self.estimator.values, **fields}


def resolve(spec: SweepSpec) -> tuple[list[Any], list[Any]]:
    """Build every task and estimator and check the whole sweep before anything runs."""
    check_spec(spec)  # each setting's own check (bench/run/settings.py); the checks across settings follow
    for path in spec.includes:
        include(path)
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device {spec.device!r} requested but CUDA is not available here; valid: cpu")
    if spec.memory == "process" and spec.device != "cpu":
        raise SpecError("--memory process measures CPU resident memory; on CUDA use inprocess or auto")
    ESTIMATORS.create(spec.baseline)  # a bad --baseline is refused before anything runs
    tasks = _distinct([TASKS.create(name) for name in spec.tasks])  # aliases and repeats run once
    estimators = _distinct([ESTIMATORS.create(name) for name in spec.estimators])
    for task in tasks:
        task.preflight()
        for target in spec.targets:
            task.check_target(target)
        for steps in spec.steps:
            task.check_steps(steps)
        for target, steps in itertools.product(spec.targets, spec.steps):
            task.check_point(target, steps)
    for estimator, steps in itertools.product(estimators, spec.steps):
        estimator.check_steps(steps)
    for estimator, task in itertools.product(estimators, tasks):
        estimator.check_task(task)
    return tasks, estimators


def _distinct(items: list[Any]) -> list[Any]:
    """The first of each canonical spec ('bptt' is 'full'; 'truncated[k=1]' is 'truncated')."""
    seen: dict[str, Any] = {}
    for item in items:
        seen.setdefault(item.spec, item)
    return list(seen.values())


def expand(spec: SweepSpec, tasks: list[Any], estimators: list[Any]) -> list[Cell]:
    """Every cell of the sweep, grouped by point (task, target, N, seed) in the spec's order."""
    cells: dict[str, Cell] = {}
    hashes = CodeHashes()
    for task, target, steps, seed, estimator in itertools.product(
        tasks, dict.fromkeys(spec.targets), dict.fromkeys(spec.steps), dict.fromkeys(spec.seeds), estimators
    ):
        cell = make_cell(spec, task, estimator, target, steps, seed, hashes)
        cells.setdefault(cell.key, cell)
    return list(cells.values())


def reference_estimator(task: Any, estimator: Any) -> str | None:
    """The spec of the estimator whose gradient a cell's agreement is measured against: full
    backprop, checkpointed where the task's graph does not fit, or the estimator's own reference
    where it samples another chain (edict); None where the task measures no agreement."""
    if task.reference_dtype is None:
        return None
    spec = estimator.reference_spec()
    return "checkpoint" if spec == "full" and task.reference_checkpointed else spec


class CodeHashes:
    """code_hash of each task, estimator and reference of a sweep (and each task's data
    fingerprint), computed once per spec."""

    def __init__(self) -> None:
        self.codes: dict[tuple[type, str], str] = {}
        self.data: dict[str, str] = {}

    def code(self, component: Any) -> str:
        """The hash of a task's or an estimator's code and of what it resolves by name at run time."""
        key = (type(component), component.spec)
        if key not in self.codes:
            self.codes[key] = code_hash(type(component), *component.code_objects())
        return self.codes[key]

    def reference(self, spec: str) -> str:
        return self.code(ESTIMATORS.create(spec))

    def task_data(self, task: Any) -> str:
        if task.spec not in self.data:
            self.data[task.spec] = task.data_fingerprint()
        return self.data[task.spec]


def make_cell(
    spec: SweepSpec, task: Any, estimator: Any, target: str, steps: int, seed: int, hashes: CodeHashes
) -> Cell:
    """A cell and its key: the readable specs, and the hashes of every piece of code that can change
    what it computes: the task's (with its sampler and reward), the estimator's, and the
    reference's, against which its agreement figures are measured."""
    reference = reference_estimator(task, estimator)
    identity = {
        "schema": store.SCHEMA,
        "task": task.spec,
        "task_version": task.version,
        "task_code": hashes.code(task),
        "task_data": hashes.task_data(task),
        "estimator": estimator.spec,
        "estimator_code": hashes.code(estimator),
        **({"reference_code": hashes.reference(reference)} if reference is not None else {}),
        "target": target,
        "steps": steps,
        "seed": seed,
        "iters": spec.iters,
        "device": spec.device,
        **({"budget": spec.budget} if spec.budget else {}),  # absent when off: earlier keys stay valid
    }
    return Cell(task, estimator, target, steps, seed, cell_key(identity), identity)


def timing_threads(spec: SweepSpec) -> int:
    """Intra-op threads of the timing: --threads, else 1 on a CPU (measured, docs/methodology.md, "Timing":
    one thread loses ~10 % quiet and nothing beside a busy core; two lose 3x there), else torch's."""
    if spec.threads:
        return spec.threads
    return 1 if spec.device == "cpu" else torch.get_num_threads()


def plan(specs: list[SweepSpec]) -> list[tuple[SweepSpec, list[Cell]]]:
    """Every part of a sweep with its cells, each part resolved and checked before anything runs."""
    return [(spec, expand(spec, *resolve(spec))) for spec in specs]
