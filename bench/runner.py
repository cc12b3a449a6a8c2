"""The sweep: expand a spec into cells, group them by point (task, target, N, seed), run each
point's cells through the phases of a cell, and append one row per cell as it finishes. A
failing cell is a row, never fatal.

The phases of a cell, each returning its part of the row:
  setup      build the problem, check it can be served, the cost model's prediction
  agreement  one untimed gradient: counts, finiteness, cosine to the reference
  reference  the exact gradient at the point (computed once per point, in float64 where possible)
  timing     rounds, interleaved with the point's other cells and with the time model's units
             F, V and H on the task's model (bench/timing.py)
  memory     peak memory of one gradient and the memory model (bench/memory.py)
  optimise   a short Adam run with the estimator
  evaluate   quality of the optimised sampler beside the unoptimised one's, and the real floor
  samples    the before/after sample grid of image tasks"""
from __future__ import annotations

import itertools
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from bench import store
from bench.errors import Diverged, SkipCell, SpecError
from bench.guard import children, end_strays, guarded, leave_if_forked
from bench.identity import cell_key, code_hash
from bench.isolate import run_in_process
from bench.limits import Clock, is_user_interrupt, outcome, sigint_recorded
from bench.memory import MODES as MEMORY_MODES
from bench.memory import MemoryMeter
from bench.options import split_list
from bench.provenance import write_run_json
from bench.registry import ESTIMATORS, TASKS, include
from bench.timing import UNIT_CALLS, paired_ratio, synchronize, time_interleaved, unit_calls, units_from

DEFAULT_TASK = "digits"
DEFAULT_ESTIMATORS = "full,checkpoint,adjoint,sdo,truncated[k=2]"
DEFAULT_STEPS = (10, 20)
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_STABLE_CAP_S = 300.0  # timing seconds per point when --stable is given without --timing-cap
MAX_SEED = 2**63 - 1
ISOLATE_MODES = {
    "auto": "cell on CUDA, none on a CPU",
    "cell": "each cell in a freshly spawned process (own allocator; a hung kernel is killed)",
    "none": "every cell in the sweep's process",
}


@dataclass
class SweepSpec:
    tasks: list[str] = field(default_factory=lambda: [DEFAULT_TASK])
    estimators: list[str] = field(default_factory=lambda: split_list(DEFAULT_ESTIMATORS))
    targets: list[str] = field(default_factory=lambda: ["latent", "cond", "weights"])
    steps: list[int] = field(default_factory=lambda: list(DEFAULT_STEPS))
    seeds: list[int] = field(default_factory=lambda: [0])
    iters: int = 4  # Adam iterations of the short optimisation
    warmup: int = 1  # untimed calls of each cell right before its timed rounds (the agreement call came earlier)
    rounds: int = 3  # clean timed rounds at least
    memory: str = "auto"  # one of MEMORY_MODES
    timeout: float | None = DEFAULT_TIMEOUT_S  # seconds per cell; None or 0: no limit
    device: str = "cpu"
    includes: list[str] = field(default_factory=list)
    isolate: str = "auto"  # one of ISOLATE_MODES
    threads: int = 0  # torch intra-op threads; 0: 1 on a CPU (README, "Timing"), torch's default on CUDA
    interleave: bool = True  # time the cells of a point round-robin
    baseline: str = "full"  # the estimator time ratios are taken to
    stable: float = 0.0  # > 0: time until IQR / median <= stable (or the cap)
    timing_cap: float = 0.0  # seconds of timing per point; 0: none (DEFAULT_STABLE_CAP_S with --stable)
    budget: float = 0.0  # seconds of optimisation per cell (gradients and Adam steps); iters caps; 0: iters only


# --remeasure: what can be measured again without computing the gradients again, and the row
# fields each replaces (the harness's code is in no cell key: README, "What a cell's key covers")
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
    for path in spec.includes:
        include(path)
    if spec.device not in ("cpu", "cuda") and not spec.device.startswith("cuda:"):
        raise SpecError(f"unknown device {spec.device!r}; valid: cpu, cuda, cuda:N")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device {spec.device!r} requested but CUDA is not available here; valid: cpu")
    for name, values in (("tasks", spec.tasks), ("estimators", spec.estimators), ("targets", spec.targets),
                         ("steps", spec.steps), ("seeds", spec.seeds)):
        if not values:
            raise SpecError(f"--{name} is empty; give at least one")
    for steps in spec.steps:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SpecError(f"step count must be a positive integer, got {steps}")
    for seed in spec.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise SpecError(f"seed {seed} is out of range; valid: 0..{MAX_SEED} (torch generators take 64 bits)")
    for label, value, low in (("iters", spec.iters, 0), ("rounds", spec.rounds, 1), ("warmup", spec.warmup, 0),
                              ("threads", spec.threads, 0)):
        if value < low:
            raise SpecError(f"--{label} must be >= {low}, got {value}")
    for label, value in (("timeout", spec.timeout), ("timing-cap", spec.timing_cap), ("budget", spec.budget)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SpecError(f"--{label} must be a finite number of seconds >= 0 (0: no limit), got {value}")
    if not (math.isfinite(spec.stable) and 0 <= spec.stable < 1):
        raise SpecError(f"--stable must be a fraction in [0, 1) (IQR / median; 0: off), got {spec.stable}")
    if spec.memory not in MEMORY_MODES:
        raise SpecError(f"unknown memory mode {spec.memory!r}; valid: {', '.join(MEMORY_MODES)}")
    if spec.isolate not in ISOLATE_MODES:
        raise SpecError(f"unknown isolation {spec.isolate!r}; valid: {', '.join(ISOLATE_MODES)}")
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
            tasks, dict.fromkeys(spec.targets), dict.fromkeys(spec.steps), dict.fromkeys(spec.seeds), estimators):
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


def make_cell(spec: SweepSpec, task: Any, estimator: Any, target: str, steps: int, seed: int,
              hashes: CodeHashes) -> Cell:
    """A cell and its key: the readable specs, and the hashes of every piece of code that can change
    what it computes: the task's (with its sampler and reward), the estimator's, and the
    reference's, against which its agreement figures are measured."""
    reference = reference_estimator(task, estimator)
    identity = {
        "schema": store.SCHEMA, "task": task.spec, "task_version": task.version,
        "task_code": hashes.code(task), "task_data": hashes.task_data(task),
        "estimator": estimator.spec, "estimator_code": hashes.code(estimator),
        **({"reference_code": hashes.reference(reference)} if reference is not None else {}),
        "target": target, "steps": steps, "seed": seed, "iters": spec.iters, "device": spec.device,
        **({"budget": spec.budget} if spec.budget else {}),  # absent when off: earlier keys stay valid
    }
    return Cell(task, estimator, target, steps, seed, cell_key(identity), identity)


def timing_threads(spec: SweepSpec) -> int:
    """Intra-op threads of the timing: --threads, else 1 on a CPU (measured in README, "Timing":
    one thread loses ~10 % quiet and nothing beside a busy core; two lose 3x there), else torch's."""
    if spec.threads:
        return spec.threads
    return 1 if spec.device == "cpu" else torch.get_num_threads()


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


class Attempt:
    """One cell on its way to a row: its clock (limit and phase seconds), the row parts its phases
    returned, and the outcome that ended it early, if any."""

    def __init__(self, cell: Cell, limit: float | None, kept: dict[str, Any] | None = None,
                 remeasure: frozenset[str] = frozenset()) -> None:
        self.cell, self.clock = cell, Clock(limit)
        # --remeasure: the cell's earlier row, whose fields are kept but for those re-measured
        self.kept, self.remeasure = (kept, remeasure) if kept is not None and remeasure else (None, frozenset())
        self.parts: dict[str, Any] = {}
        self.ended: dict[str, Any] | None = None
        self.problem = None
        self.rng = random.Random(cell.seed)
        self.cost = None
        self.grad: torch.Tensor | None = None

    def run(self, phase: str, fn: Callable[[], Any]) -> Any:
        """fn's result within the cell's limit, timed as `phase`; None once the cell has ended."""
        if self.ended is not None:
            return None
        try:
            with self.clock.phase(phase):
                return fn()
        except BaseException as exc:  # a failing cell is data, even sys.exit() in a plug-in
            leave_if_forked()
            self.fail(exc)
            return None
        finally:
            leave_if_forked()

    def fail(self, exc: BaseException) -> None:
        self.ended = outcome(exc)  # re-raises the user's Ctrl-C

    def add(self, fields: dict[str, Any] | None) -> None:
        if fields and self.ended is None:
            self.parts.update(fields)

    def measures(self, what: str) -> bool:
        """Whether this attempt runs phase group `what` (time, memory, or the rest: compute)."""
        return self.kept is None or what in self.remeasure

    def row(self) -> dict[str, Any]:
        phases = {name: round(seconds, 3) for name, seconds in self.clock.phases.items()}
        fields = {"status": "ok", **self.parts, **(self.ended or {})}
        if self.kept is not None:  # the earlier row's figures, but for those measured again
            kept = {k: v for k, v in self.kept.items() if k not in IDENTITY_FIELDS
                    and not any(REMEASURED[what](k) for what in self.remeasure)}
            fields = {**kept, **fields, "remeasured": sorted(self.remeasure)}
        return self.cell.row(**fields, phase_s=phases, cell_seconds=round(self.clock.spent, 3))


class CellRunner:
    """Runs the cells of one sweep a point at a time; caches what a point, a task or a problem
    shares (the reference gradient, the time and memory units, the unoptimised quality)."""

    def __init__(self, spec: SweepSpec, out: Path | None = None) -> None:
        self.spec, self.out = spec, out
        self.device = torch.device(spec.device)
        self.threads, self.threads_before = timing_threads(spec), torch.get_num_threads()
        torch.set_num_threads(self.threads)  # restored by close()
        self.memory = MemoryMeter(spec.memory, self.device, spec.includes)
        self.baseline = ESTIMATORS.create(spec.baseline).spec
        self.references: dict[tuple, torch.Tensor | None] = {}
        self.initial_quality: dict[tuple, dict[str, Any]] = {}
        self.floors: dict[tuple[str, str], dict[str, Any]] = {}
        self.ready_tasks: set[int] = set()

    def close(self) -> None:
        self.memory.close()
        torch.set_num_threads(self.threads_before)

    def run(self, cell: Cell) -> dict[str, Any]:
        return next(iter(self.run_point([cell])))

    def run_point(self, cells: list[Cell], companions: Iterable[Cell] = (), kept: dict[str, dict[str, Any]] | None = None,
                  remeasure: frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
        """Rows of `cells` (one point), yielded as each finishes. `companions` (cells of the point
        already done, e.g. the baseline on a resumed sweep) are timed beside them, not re-rowed.
        With `remeasure` (time, memory), a cell with a row in `kept` runs only its set-up and those
        phases; its other fields come from that row."""
        kept = kept or {}
        attempts = [Attempt(cell, self.spec.timeout, kept.get(cell.key), remeasure) for cell in cells]
        extra = [Attempt(cell, self.spec.timeout) for cell in companions]
        for attempt in attempts + extra:
            with attempt.clock.accounting():
                attempt.add(attempt.run("setup", lambda: self._setup(attempt)))
                if attempt.measures("compute"):
                    attempt.add(attempt.run("agreement", lambda: self._agreement(attempt)))
                    attempt.add(attempt.run("reference", lambda: self._agreement_to_reference(attempt)))
        start = time.perf_counter()
        timed = [a for a in attempts + extra if a.ended is None and a.measures("time")]
        before = sum(a.clock.spent for a in timed)
        self.memory.wait_idle()  # the memory process is idle: the cores are the timing's alone
        self._time(timed)
        shared = time.perf_counter() - start - (sum(a.clock.spent for a in timed) - before)
        for attempt in timed:  # the timing loop's own cost, and waiting for the memory process
            attempt.clock.charge("harness", shared / len(timed))
        for attempt in attempts:
            with attempt.clock.accounting():
                if attempt.ended is None and attempt.measures("memory"):
                    self.memory.prepare(attempt.cell)  # the worker's start and the task's set-up: the harness's
                    attempt.add(attempt.run("memory", lambda: self.memory.measure(
                        attempt.cell, attempt.problem, attempt.rng, attempt.cost)))
                if not attempt.measures("compute"):
                    yield attempt.row()
                    continue
                optimised = attempt.run("optimise", lambda: self._optimise(attempt))
                if optimised is not None:
                    fields, problem, first_x0, x0 = optimised
                    attempt.add(fields)
                    attempt.add(attempt.run("evaluate", lambda: self._evaluate(attempt, problem, x0)))
                    attempt.add(attempt.run("samples", lambda: self._save_samples(attempt.cell, problem,
                                                                                  first_x0, x0)))
            yield attempt.row()

    # -- phases ------------------------------------------------------------------------------

    def _setup(self, attempt: Attempt) -> dict[str, Any]:
        cell = attempt.cell
        if id(cell.task) not in self.ready_tasks:
            cell.task.setup(self.device)
            self.ready_tasks.add(id(cell.task))
        problem = cell.task.make_problem(cell.target, cell.steps, cell.seed)
        if cell.target in ("cond", "weights") and not problem.chain.schedule.effective_steps():
            raise SkipCell("every step of this schedule is an identity step (the denoiser's output "
                           "has weight 0), so cond and weights do not change the samples")
        reason = cell.estimator.applies(problem)
        if reason:
            raise SkipCell(reason)
        attempt.problem, attempt.cost = problem, cell.estimator.cost_for(problem)
        cost = attempt.cost
        return {"sampler": cell.estimator.sampler or problem.chain.schedule.sampler, "threads": self.threads,
                "nfe_forward_pred": cost.nfe_forward, "nfe_vjp_pred": cost.nfe_vjp,
                "time_pred_checkpointed": cost.checkpointed_forwards, "mem_class": cost.memory,
                "mem_pred_activations": cost.activations, "mem_pred_latents": cost.latents}

    def _agreement(self, attempt: Attempt) -> dict[str, Any]:
        problem = attempt.problem
        problem.chain.counter.reset()
        attempt.cell.estimator(problem, attempt.rng)
        grad = problem.flat_grad().detach().double()
        if not _finite(grad):
            raise Diverged("non-finite gradient")
        attempt.grad = grad
        return {"nfe_forward": problem.chain.counter.forward, "nfe_vjp": problem.chain.counter.vjp,
                "grad_norm": float(grad.norm())}

    def _agreement_to_reference(self, attempt: Attempt) -> dict[str, Any]:
        exact, reference, reference_dtype = self.reference(attempt.cell)
        fields: dict[str, Any] = {"reference": reference, "reference_dtype": reference_dtype}
        if exact is not None:
            grad = attempt.grad
            norm = float(grad.norm() * exact.norm())
            fields["grad_cos"] = float(grad @ exact) / norm if norm > 0 else float("nan")
            fields["grad_rel_err"] = (float((grad - exact).norm() / exact.norm()) if float(exact.norm()) > 0
                                      else float("nan"))
            fields["exact_grad_norm"] = float(exact.norm())
        return fields

    def reference(self, cell: Cell) -> tuple[torch.Tensor | None, str, str]:
        """(exact gradient, estimator, dtype) of the cell's discrete chain at its point
        (`reference_estimator`), or none (agreement is then not measured)."""
        spec, dtype = reference_estimator(cell.task, cell.estimator), cell.task.reference_dtype
        if spec is None:
            return None, "off", "none"
        key = (*cell.point, spec)
        if key not in self.references:
            problem = cell.task.make_problem(cell.target, cell.steps, cell.seed, dtype=dtype)
            try:
                ESTIMATORS.create(spec)(problem, random.Random(cell.seed))
                self.references[key] = problem.flat_grad().detach().double()
            except SkipCell:  # a non-differentiable reward: no backprop reference exists
                self.references[key] = None
        if self.references[key] is None:
            return None, "none (the reward is not differentiable)", "none"
        return self.references[key], spec, str(dtype).replace("torch.", "")

    def _time(self, attempts: list[Attempt]) -> None:
        """The timing phase of a point's cells, round-robin, each call within its cell's limit;
        the time model's units F, V and H measured in the same passes, on the first cell's problem
        (its model and batch are the point's; the unit calls change no parameter and no .grad)."""
        if not attempts:
            return

        def timed_call(attempt: Attempt) -> Callable[[], None]:
            def call() -> None:
                try:
                    with attempt.clock.phase("timing"):
                        attempt.cell.estimator(attempt.problem, attempt.rng)
                finally:
                    leave_if_forked()
            return call

        calls = {a.cell.key: timed_call(a) for a in attempts}
        calls.update(unit_calls(attempts[0].problem))
        cap = self.spec.timing_cap or (DEFAULT_STABLE_CAP_S if self.spec.stable else 0.0)
        results = time_interleaved(calls, self.device, rounds=self.spec.rounds, threads=self.threads,
                                   stable=self.spec.stable, cap_s=cap, warmup=self.spec.warmup,
                                   fatal=is_user_interrupt)
        units = units_from(results)
        unit_seconds = sum(sum(results[name].seconds) for name in UNIT_CALLS)
        baseline = next((a for a in attempts if a.cell.estimator.spec == self.baseline
                         and results[a.cell.key].error is None), None)
        for attempt in attempts:
            attempt.clock.charge("units", unit_seconds / len(attempts))
            result = results[attempt.cell.key]
            if result.error is not None:
                attempt.fail(result.error)
                continue
            attempt.add({**result.summary(), "time_paired": len(attempts) > 1})
            if units is not None:
                attempt.add({"time_unit_f_s": units["F"], "time_unit_v_s": units["V"], "time_unit_h_s": units["H"],
                             "time_pred_s": attempt.cost.predicted_seconds(units["F"], units["V"], units["H"])})
            if baseline is not None:
                ratio = paired_ratio(result, results[baseline.cell.key])
                if ratio is not None:
                    attempt.add({"time_baseline": self.baseline, "time_vs_baseline": ratio["ratio"],
                                 **({"time_vs_baseline_lo": ratio["lo"], "time_vs_baseline_hi": ratio["hi"]}
                                    if "lo" in ratio else {})})

    def _optimise(self, attempt: Attempt):
        """(row fields, the optimised problem, samples before, samples after) of a short Adam run:
        `iters` iterations, or fewer once the gradients and steps have taken `budget` seconds."""
        cell, rng = attempt.cell, attempt.rng
        problem = cell.task.make_problem(cell.target, cell.steps, cell.seed)
        optimiser = torch.optim.Adam(problem.leaves, lr=cell.task.learning_rates[cell.target])
        # curve: mean reward of the N-step chain's samples at iterate iterates[j]; seconds: the
        # optimisation wall-clock (gradients and Adam steps, no evaluation) spent to reach it. An
        # estimator whose gradient pass samples another chain (shortcut-model) has the N-step chain
        # evaluated apart, untimed, at iterates 0, 1, 2, 4, 8, ... and every iters // 16-th.
        own = cell.estimator.samples_long_chain
        stride = max(1, self.spec.iters // 16)
        curve, seconds, iterates, elapsed, first_x0, done = [], [], [], 0.0, None, 0
        while done < self.spec.iters and not (self.spec.budget and elapsed >= self.spec.budget):
            if not own and (done % stride == 0 or done & (done - 1) == 0):
                x0 = cell.estimator.sample(problem)
                first_x0 = x0 if first_x0 is None else first_x0
                curve.append(float(problem.reward_fn(x0).mean()))
                seconds.append(elapsed)
                iterates.append(done)
            synchronize(self.device)
            start = time.perf_counter()
            outcome_ = cell.estimator(problem, rng)
            if not (math.isfinite(outcome_.loss) and _finite(problem.flat_grad())):
                raise Diverged(f"non-finite loss or gradient at optimisation iteration {done + 1}")
            optimiser.step()
            synchronize(self.device)
            if own:
                first_x0 = outcome_.x0 if first_x0 is None else first_x0
                curve.append(float(outcome_.rewards.mean()))
                seconds.append(elapsed)
                iterates.append(done)
            elapsed += time.perf_counter() - start
            done += 1
        x0 = cell.estimator.sample(problem)
        curve.append(float(problem.reward_fn(x0).mean()))
        seconds.append(elapsed)
        iterates.append(done)
        fields = {"reward_init": curve[0], "reward_curve": curve, "reward_curve_s": seconds, "optim_seconds": elapsed,
                  "iters_done": done}
        if iterates != list(range(len(curve))):
            fields["reward_curve_iter"] = iterates
        return fields, problem, first_x0, x0

    def _evaluate(self, attempt: Attempt, problem, x0: torch.Tensor) -> dict[str, Any]:
        """The optimised sampler's metrics, the unoptimised sampler's at the same point (`_init`),
        and the task's real-versus-real floor (`_floor`)."""
        cell = attempt.cell
        metrics = cell.task.evaluate(problem, x0)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise Diverged(f"non-finite evaluation after optimisation: {metrics}")
        key = (*cell.point, cell.estimator.sampler)  # the point's task spec names its sampler
        if key not in self.initial_quality:
            start = cell.task.make_problem(cell.target, cell.steps, cell.seed)
            self.initial_quality[key] = cell.task.evaluate(start, cell.estimator.sample(start))
        if (cell.task.spec, cell.target) not in self.floors:
            self.floors[cell.task.spec, cell.target] = cell.task.quality_floor(cell.target)
        fields = {"reward_final": metrics["reward"], **{f"eval_{k}": v for k, v in metrics.items()}}
        fields.update({f"eval_{k}_init": v for k, v in self.initial_quality[key].items()})
        fields.update({f"eval_{k}_floor": v for k, v in self.floors[cell.task.spec, cell.target].items()})
        reference = cell.task.quality_reference(cell.target)
        return {**fields, **({"eval_reference": reference} if reference else {})}

    def _save_samples(self, cell: Cell, problem, before, after) -> dict[str, Any]:
        """OUT/samples/<key>.png: the samples before (top row) and after (bottom row) the
        optimisation, for tasks whose samples are images; the path relative to the run folder."""
        if self.out is None or before is None:
            return {}
        images = [cell.task.images(problem, x) for x in (before, after)]
        if images[0] is None:
            return {}
        from torchvision.utils import save_image

        shown = min(8, images[0].shape[0])
        folder = self.out / "samples"
        folder.mkdir(exist_ok=True)
        save_image(torch.cat([images[0][:shown], images[1][:shown]]).float().cpu(), folder / f"{cell.key}.png",
                   nrow=shown, padding=1, pad_value=1.0)
        return {"samples_png": f"samples/{cell.key}.png"}


def plan(specs: list[SweepSpec]) -> list[tuple[SweepSpec, list[Cell]]]:
    """Every part of a sweep with its cells, each part resolved and checked before anything runs."""
    return [(spec, expand(spec, *resolve(spec))) for spec in specs]


def run_sweep(spec: SweepSpec | list[SweepSpec], out: Path, force: bool = False, argv: list[str] | None = None,
              on_start: Callable[[int, int], None] | None = None,
              on_point: Callable[[list[Cell]], None] | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None,
              extra: dict[str, Any] | None = None, remeasure: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Run, in this process, every cell of the sweep (its parts, one after the other) that has no
    row in the run folder yet (all of them with force); return the rows of the sweep's cells. With
    `remeasure` ({'time', 'memory'} or part of it), the cells whose row is ok are measured again
    in those respects only, their other fields kept (gradients are not computed again)."""
    unknown = set(remeasure) - set(REMEASURED)
    if unknown:
        raise SpecError(f"--remeasure {','.join(sorted(unknown))}: valid: {', '.join(REMEASURED)}")
    parts = plan(spec if isinstance(spec, list) else [spec])
    with store.locked(out):
        rows_path = out / store.ROWS
        store.repair(rows_path)
        done = store.latest_by_key(store.read_rows(out))  # rows.jsonl and every job's rows.d file
        write_run_json(out, [s for s, _ in parts], argv, [c for _, cells in parts for c in cells], extra)
        kept = {} if force or not remeasure else {key: row for key, row in done.items() if row.get("status") == "ok"}
        todo = {c.key for _, cells in parts for c in cells if force or c.key not in done or c.key in kept}
        todo -= _held_by_live_jobs(out, todo)
        total = len({c.key for _, cells in parts for c in cells})
        if on_start:
            on_start(total, total - len(todo))

        def write(row: dict[str, Any]) -> None:
            store.append_row(rows_path, row)
            if on_row:
                on_row(row)

        for part, cells in parts:
            run_cells(part, out, [c for c in cells if c.key in todo], done, True, write, on_point,
                      kept=kept, remeasure=frozenset(remeasure))
            todo -= {c.key for c in cells}
    return list({c.key: done[c.key] for _, cells in parts for c in cells if c.key in done}.values())


def _held_by_live_jobs(out: Path, keys: set[str]) -> set[str]:
    """The keys among `keys` that a live job (submitted by any launcher) holds or has queued: not
    run here, whoever asks (--force included), and said once."""
    from bench.launch import busy_cells  # the launchers build on this module

    busy = busy_cells(out)
    held = {key for key in keys if key in busy}
    if held:
        jobs = sorted({busy[key] for key in held})
        warnings.warn(f"{len(held)} cell(s) are held by live job(s) {', '.join(jobs)} and are left to them; "
                      f"see python -m bench status {out}", stacklevel=2)
    return held


def run_cells(spec: SweepSpec, out: Path, cells: list[Cell], done: dict[str, dict[str, Any]], force: bool,
              write: Callable[[dict[str, Any]], None],
              on_point: Callable[[list[Cell]], None] | None = None,
              kept: dict[str, dict[str, Any]] | None = None, remeasure: frozenset[str] = frozenset()) -> None:
    """Run `cells` (of one part) a point at a time, calling write(row) as each finishes and
    recording it in `done`. A cell already in `done` is skipped unless force. A cell with a row in
    `kept` is only measured again (`remeasure`: time, memory)."""
    kept = kept or {}
    points: dict[tuple, list[Cell]] = {}
    for cell in cells:
        points.setdefault(cell.point, []).append(cell)
    baseline = ESTIMATORS.create(spec.baseline)
    timed_beside = spec.interleave and baseline.spec in {ESTIMATORS.create(name).spec for name in spec.estimators}
    hashes = CodeHashes()
    isolate = spec.isolate == "cell" or (spec.isolate == "auto" and spec.device.startswith("cuda"))
    runner = None if isolate else CellRunner(spec, out)
    try:
        with sigint_recorded(), guarded():
            for point_cells in points.values():
                waiting = [cell for cell in point_cells if force or cell.key not in done]
                if not waiting:
                    continue
                if on_point:
                    on_point(waiting)
                companions = (_baseline_companion(spec, point_cells[0], baseline, waiting, hashes)
                              if timed_beside else [])
                before = children()
                for row in _point_rows(spec, runner, companions, waiting, out, isolate, kept, remeasure):
                    leave_if_forked()
                    write(row)
                    done[row["key"]] = row
                end_strays(before)  # what the point's code left running
    finally:
        if runner is not None:
            runner.close()


def _baseline_companion(spec: SweepSpec, cell: Cell, baseline: Any, waiting: list[Cell],
                        hashes: CodeHashes) -> list[Cell]:
    """The point's baseline cell (of the sweep), to be timed beside `waiting` when it is not among
    them (its row exists, or another job runs it)."""
    if any(c.estimator.spec == baseline.spec for c in waiting):
        return []
    return [make_cell(spec, cell.task, baseline, cell.target, cell.steps, cell.seed, hashes)]


def _point_rows(spec: SweepSpec, runner: CellRunner | None, companions: list[Cell], waiting: list[Cell],
                out: Path, isolate: bool, kept: dict[str, dict[str, Any]],
                remeasure: frozenset[str]) -> Iterator[dict[str, Any]]:
    """Rows of a point's waiting cells: interleaved in this process (with the baseline timed beside
    them when it is not among them), one by one, or each in its own process."""
    if isolate:
        for cell in waiting:
            yield run_in_process(spec, cell, out, kept.get(cell.key), remeasure)
    elif spec.interleave:
        yield from runner.run_point(waiting, companions, kept, remeasure)
    else:
        for cell in waiting:
            yield from runner.run_point([cell], (), kept, remeasure)
