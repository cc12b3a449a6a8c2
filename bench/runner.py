"""The sweep: expand a spec into cells, run each (gradient agreement, timing, memory, a short
optimisation), append one row per cell as it finishes. A failing cell is a row, never fatal."""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
import random
import signal
import subprocess
import threading
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import bench
from bench import store
from bench.errors import SkipCell, SpecError
from bench.identity import cell_key, code_hash
from bench.isolate import run_in_process
from bench.measure import (cuda_peak_bytes, median_iqr, rss_peak_bytes, rss_supported, synchronize,
                           tensor_bytes, time_rounds)
from bench.memworker import MemoryWorker, one_kept_call
from bench.options import split_list
from bench.problem import Problem
from bench.registry import ESTIMATORS, TASKS, include

DEFAULT_TASK = "digits"
DEFAULT_ESTIMATORS = "full,checkpoint,adjoint,sdo,truncated[k=2]"
DEFAULT_STEPS = (10, 20)
DEFAULT_TIMEOUT_S = 1800.0
MAX_SEED = 2**63 - 1
ISOLATE_MODES = {
    "auto": "cell on CUDA, none on a CPU",
    "cell": "each cell in a freshly spawned process (own allocator; a hung kernel is killed)",
    "none": "every cell in the sweep's process",
}
MEMORY_MODES = {
    "auto": "process on CPU, inprocess on CUDA",
    "process": "CPU: peak resident memory of a process forked per cell from a clean worker",
    "inprocess": "CUDA: the allocator's peak; CPU: resident high-water mark in the sweep's own "
                 "process (heap reuse can hide memory)",
    "off": "no memory measurement",
}


@dataclass
class SweepSpec:
    tasks: list[str] = field(default_factory=lambda: [DEFAULT_TASK])
    estimators: list[str] = field(default_factory=lambda: split_list(DEFAULT_ESTIMATORS))
    targets: list[str] = field(default_factory=lambda: ["latent", "cond", "weights"])
    steps: list[int] = field(default_factory=lambda: list(DEFAULT_STEPS))
    seeds: list[int] = field(default_factory=lambda: [0])
    iters: int = 4  # Adam iterations of the short optimisation
    warmup: int = 0  # extra untimed calls: the gradient-agreement call already precedes timing
    rounds: int = 3
    memory: str = "auto"  # one of MEMORY_MODES
    timeout: float | None = DEFAULT_TIMEOUT_S  # seconds per cell; None or 0: no limit
    device: str = "cpu"
    includes: list[str] = field(default_factory=list)
    isolate: str = "auto"  # one of ISOLATE_MODES


@dataclass
class Cell:
    task: Any
    estimator: Any
    target: str
    steps: int
    seed: int
    key: str
    identity: dict[str, Any]

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
    for label, value, low in (("iters", spec.iters, 0), ("rounds", spec.rounds, 1), ("warmup", spec.warmup, 0)):
        if value < low:
            raise SpecError(f"--{label} must be >= {low}, got {value}")
    if spec.timeout is not None and not (math.isfinite(spec.timeout) and spec.timeout >= 0):
        raise SpecError(f"--timeout must be a finite number of seconds >= 0 (0: no limit), got {spec.timeout}")
    if spec.memory not in MEMORY_MODES:
        raise SpecError(f"unknown memory mode {spec.memory!r}; valid: {', '.join(MEMORY_MODES)}")
    if spec.isolate not in ISOLATE_MODES:
        raise SpecError(f"unknown isolation {spec.isolate!r}; valid: {', '.join(ISOLATE_MODES)}")
    if spec.memory == "process" and spec.device != "cpu":
        raise SpecError("--memory process measures CPU resident memory; on CUDA use inprocess or auto")
    tasks = _distinct([TASKS.create(name) for name in spec.tasks])  # aliases and repeats run once
    estimators = _distinct([ESTIMATORS.create(name) for name in spec.estimators])
    for task in tasks:
        task.preflight()
        for target in spec.targets:
            task.check_target(target)
        for steps in spec.steps:
            task.check_steps(steps)
    for estimator, steps in itertools.product(estimators, spec.steps):
        estimator.check_steps(steps)
    return tasks, estimators


def _distinct(items: list[Any]) -> list[Any]:
    """The first of each canonical spec ('bptt' is 'full'; 'truncated[k=1]' is 'truncated')."""
    seen: dict[str, Any] = {}
    for item in items:
        seen.setdefault(item.spec, item)
    return list(seen.values())


def expand(spec: SweepSpec, tasks: list[Any], estimators: list[Any]) -> list[Cell]:
    cells: dict[str, Cell] = {}
    task_code = {id(task): (code_hash(type(task)), task.data_fingerprint()) for task in tasks}
    estimator_code = {id(estimator): code_hash(type(estimator)) for estimator in estimators}
    for task, target, estimator, steps, seed in itertools.product(
            tasks, dict.fromkeys(spec.targets), estimators, dict.fromkeys(spec.steps), dict.fromkeys(spec.seeds)):
        identity = {
            "schema": store.SCHEMA, "task": task.spec, "task_version": task.version,
            "task_code": task_code[id(task)][0], "task_data": task_code[id(task)][1],
            "estimator": estimator.spec, "estimator_code": estimator_code[id(estimator)],
            "target": target, "steps": steps, "seed": seed, "iters": spec.iters, "device": spec.device,
        }
        key = cell_key(identity)
        cells.setdefault(key, Cell(task, estimator, target, steps, seed, key, identity))
    return list(cells.values())


def environment(spec: SweepSpec, argv: list[str] | None) -> dict[str, Any]:
    import diffusers

    device = torch.device(spec.device)
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": argv, "spec": asdict(spec), "bench_version": bench.__version__,
        "python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda, "device": spec.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(), "platform": platform.platform(), **_git_state(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


class Diverged(Exception):
    pass


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure on any device: torch's OutOfMemoryError (CUDA, MPS, XPU), Python's
    MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


_user_interrupts: list[int] = []  # SIGINTs received during the sweep (see _sigint_recorded)


@contextmanager
def _sigint_recorded():
    """Tell the user's Ctrl-C (a real SIGINT) apart from a KeyboardInterrupt an estimator raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        _user_interrupts.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _user_interrupts.clear()


class CellTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise CellTimeout in the main thread after `seconds` (a SIGALRM timer; the exception
    surfaces at the next Python-level instruction, so within one denoiser call)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CellTimeout(f"cell exceeded the {seconds:g} s limit (--timeout)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class CellRunner:
    """Runs cells of one sweep; caches the exact reference gradient per (task, target, N, seed)."""

    def __init__(self, spec: SweepSpec, out: Path | None = None) -> None:
        self.spec, self.out = spec, out
        self.device = torch.device(spec.device)
        self.references: dict[tuple, torch.Tensor] = {}
        self.units: dict[tuple, dict[str, Any]] = {}
        self.ready_tasks: set[int] = set()
        self.memory_mode = spec.memory
        if spec.memory == "auto":
            self.memory_mode = "inprocess" if self.device.type == "cuda" else "process"
        if self.memory_mode in ("process", "inprocess") and self.device.type == "cpu" and not rss_supported():
            self.memory_mode = "unavailable"
        use_worker = self.memory_mode == "process"
        self.memory_worker = MemoryWorker(spec.includes) if use_worker else None

    def close(self) -> None:
        if self.memory_worker is not None:
            self.memory_worker.close()

    def _setup(self, task: Any) -> None:
        if id(task) not in self.ready_tasks:
            task.setup(self.device)
            self.ready_tasks.add(id(task))

    def reference(self, cell: Cell) -> tuple[torch.Tensor | None, str, str]:
        """(exact gradient, estimator, dtype) of the cell's discrete chain at its point: full
        backprop in float64, or the estimator's own reference where it samples another chain
        (edict); a task too large for that names another precision and checkpointed backprop, or
        none (agreement is then not measured)."""
        spec, dtype = cell.estimator.reference_spec(), cell.task.reference_dtype
        if dtype is None:
            return None, "off", "none"
        if spec == "full" and cell.task.reference_checkpointed:
            spec = "checkpoint"
        key = (cell.task.spec, cell.target, cell.steps, cell.seed, spec)
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

    def run(self, cell: Cell) -> dict[str, Any]:
        row = cell.row(status="ok")
        if self.memory_worker is not None:
            # (Re)starting the memory process is the sweep's cost, outside the cell's time limit.
            self.memory_worker.wait_ready()
        started = time.perf_counter()
        try:
            with time_limit(self.spec.timeout):
                self._setup(cell.task)
                self._measure(cell, row)
        except SkipCell as skip:
            row.update(status="skipped", reason=str(skip))
        except Diverged as exc:
            row.update(status="diverged", error=str(exc))
        except CellTimeout as exc:
            row.update(status="timeout", error=str(exc))
        except BaseException as exc:  # a failing cell is data, even sys.exit() in a plug-in
            if isinstance(exc, KeyboardInterrupt) and _user_interrupts:
                raise  # the user's Ctrl-C (a SIGINT) ends the sweep; completed rows are saved
            message = str(exc).splitlines()[0] if str(exc).strip() else repr(exc)
            row.update(status="oom" if is_out_of_memory(exc) else "error", error=message,
                       error_type=type(exc).__name__, traceback=traceback.format_exc(limit=-3))
        row["cell_seconds"] = round(time.perf_counter() - started, 3)
        return row

    def _measure(self, cell: Cell, row: dict[str, Any]) -> None:
        estimator, spec = cell.estimator, self.spec
        problem = cell.task.make_problem(cell.target, cell.steps, cell.seed)
        if cell.target in ("cond", "weights") and not problem.chain.schedule.effective_steps():
            raise SkipCell("every step of this schedule is an identity step (the denoiser's output "
                           "has weight 0), so cond and weights do not change the samples")
        reason = estimator.skip_reason(problem)
        if reason:
            raise SkipCell(reason)
        cost = estimator.cost_for(problem)
        row.update(sampler=estimator.sampler)
        row.update(nfe_forward_pred=cost.nfe_forward, nfe_vjp_pred=cost.nfe_vjp, mem_class=cost.memory,
                   mem_pred_activations=cost.activations, mem_pred_latents=cost.latents)
        rng = random.Random(cell.seed)

        # 1. Gradient agreement and counts (untimed).
        problem.chain.counter.reset()
        estimator(problem, rng)
        row.update(nfe_forward=problem.chain.counter.forward, nfe_vjp=problem.chain.counter.vjp)
        grad = problem.flat_grad().detach().double()
        if not _finite(grad):
            raise Diverged("non-finite gradient")
        exact, reference, reference_dtype = self.reference(cell)
        row.update(reference=reference, reference_dtype=reference_dtype)
        row["grad_norm"] = float(grad.norm())
        if exact is not None:
            norm = float(grad.norm() * exact.norm())
            row["grad_cos"] = float(grad @ exact) / norm if norm > 0 else float("nan")
            row["grad_rel_err"] = float((grad - exact).norm() / exact.norm()) if float(exact.norm()) > 0 else float("nan")
            row["exact_grad_norm"] = float(exact.norm())

        # 2. Time per gradient. The memory worker is idle (run() waited until it was ready, and it
        #    works only when asked): the cores are the timing's alone.
        times = time_rounds(lambda: estimator(problem, rng), self.device, spec.warmup, spec.rounds)
        row["time_s"], row["time_iqr_s"] = median_iqr(times)
        row["time_rounds_s"] = times

        # 3. Peak memory of one gradient, above what the problem holds before it, and the cost
        #    model's prediction from the measured units A (one kept call) and S (one latent).
        row["mem_baseline_bytes"] = tensor_bytes(_problem_tensors(problem))
        row.update(self._memory(cell, problem, rng))
        if row.get("peak_mem_bytes") is not None:
            unit_a = self._unit_activation(cell, problem)
            unit_s = problem.x_start.numel() * problem.x_start.element_size()
            row.update(mem_unit_a_bytes=unit_a, mem_unit_s_bytes=unit_s,
                       mem_pred_bytes=cost.predicted_bytes(unit_a, unit_s))

        # 4. A short optimisation with this estimator (reward of the true sampler each iteration).
        row.update(self._optimise(cell, rng))

    def _memory(self, cell: Cell, problem: Problem, rng: random.Random) -> dict[str, Any]:
        mode = self.memory_mode
        if mode in ("off", "unavailable"):
            return {"peak_mem_bytes": None, "mem_kind": mode}
        if mode == "process":
            result = self.memory_worker.measure({"task": cell.task.spec, "estimator": cell.estimator.spec,
                                                 "target": cell.target, "steps": cell.steps, "seed": cell.seed})
            kind = "rss_peak"
        else:
            problem.zero_grad()
            result = self._inprocess_peak(lambda: cell.estimator(problem, rng))
            kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak_inprocess"
        if "error" in result:
            return {"peak_mem_bytes": None, "mem_kind": kind, "mem_error": result["error"]}
        extra = {"mem_reserved_peak_bytes": result["reserved"]} if "reserved" in result else {}
        return {"peak_mem_bytes": result["peak"], "mem_process_before_bytes": result["before"], "mem_kind": kind,
                **extra}

    def _inprocess_peak(self, fn: Callable[[], object]) -> dict[str, int]:
        if self.device.type == "cuda":
            return cuda_peak_bytes(fn, self.device)
        return rss_peak_bytes(fn)

    def _unit_activation(self, cell: Cell, problem: Problem) -> float | None:
        """A: peak memory of one denoiser call with its graph kept, measured like the cells
        (cached per task, target and seed)."""
        key = (cell.task.spec, cell.target, cell.seed)
        if key not in self.units:
            if self.memory_mode == "process":
                self.units[key] = self.memory_worker.measure(
                    {"task": cell.task.spec, "target": cell.target, "steps": cell.steps,
                     "seed": cell.seed, "unit": True})
            else:
                one_kept_call(problem)  # warm-up
                self.units[key] = self._inprocess_peak(lambda: one_kept_call(problem))
        return self.units[key].get("peak")

    def _optimise(self, cell: Cell, rng: random.Random) -> dict[str, Any]:
        problem = cell.task.make_problem(cell.target, cell.steps, cell.seed)
        optimiser = torch.optim.Adam(problem.leaves, lr=cell.task.learning_rates[cell.target])
        # curve[i]: mean reward of the chain's own samples at iterate i; seconds[i]: optimisation
        # wall-clock (gradients and Adam steps, no evaluation) spent to reach iterate i.
        curve, seconds, elapsed, first_x0 = [], [], 0.0, None
        for _ in range(self.spec.iters):
            synchronize(self.device)
            start = time.perf_counter()
            outcome = cell.estimator(problem, rng)
            first_x0 = outcome.x0 if first_x0 is None else first_x0
            if not (math.isfinite(outcome.loss) and _finite(problem.flat_grad())):
                raise Diverged(f"non-finite loss or gradient at optimisation iteration {len(curve) + 1}")
            optimiser.step()
            synchronize(self.device)
            curve.append(float(outcome.rewards.mean()))
            seconds.append(elapsed)
            elapsed += time.perf_counter() - start
        x0 = cell.estimator.sample(problem)
        curve.append(float(problem.reward_fn(x0).mean()))
        seconds.append(elapsed)
        metrics = cell.task.evaluate(problem, x0)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise Diverged(f"non-finite evaluation after optimisation: {metrics}")
        grid = self._save_samples(cell, problem, first_x0, x0)
        return {"reward_init": curve[0], "reward_final": metrics["reward"], "reward_curve": curve,
                "reward_curve_s": seconds, "optim_seconds": elapsed,
                **({"samples_png": grid} if grid else {}),
                **{f"eval_{name}": value for name, value in metrics.items()}}

    def _save_samples(self, cell: Cell, problem: Problem, before, after) -> str | None:
        """OUT/samples/<key>.png: the samples before (top row) and after (bottom row) the
        optimisation, for tasks whose samples are images; the path relative to the run folder."""
        if self.out is None or before is None:
            return None
        images = [cell.task.images(problem, x) for x in (before, after)]
        if images[0] is None:
            return None
        from torchvision.utils import save_image

        shown = min(8, images[0].shape[0])
        folder = self.out / "samples"
        folder.mkdir(exist_ok=True)
        save_image(torch.cat([images[0][:shown], images[1][:shown]]).float().cpu(), folder / f"{cell.key}.png",
                   nrow=shown, padding=1, pad_value=1.0)
        return f"samples/{cell.key}.png"


def _problem_tensors(problem: Problem) -> Iterator[torch.Tensor]:
    yield from problem.chain.denoiser.parameters()
    yield from problem.chain.denoiser.buffers()
    yield problem.x_start
    if problem.cond is not None:
        yield problem.cond
    yield from problem.noises or ()


def run_sweep(spec: SweepSpec, out: Path, force: bool = False, argv: list[str] | None = None,
              on_start: Callable[[int, int], None] | None = None,
              on_cell: Callable[[Cell], None] | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run every cell not already in OUT/rows.jsonl (all of them with force); return the rows of
    this sweep's cells (fresh or reused)."""
    tasks, estimators = resolve(spec)
    cells = expand(spec, tasks, estimators)
    with store.locked(out):
        rows_path = out / store.ROWS
        store.repair(rows_path)
        done = store.latest_by_key(store.read_rows(rows_path))
        _write_run_json(out, spec, argv)
        todo = [cell for cell in cells if force or cell.key not in done]
        if on_start:
            on_start(len(cells), len(cells) - len(todo))
        isolate = spec.isolate == "cell" or (spec.isolate == "auto" and spec.device.startswith("cuda"))
        runner = None if isolate else CellRunner(spec, out)
        try:
            with _sigint_recorded():
                for cell in todo:
                    if on_cell:
                        on_cell(cell)
                    row = run_in_process(spec, cell, out) if isolate else runner.run(cell)
                    store.append_row(rows_path, row)
                    done[cell.key] = row
                    if on_row:
                        on_row(row)
        finally:
            if runner is not None:
                runner.close()
    return [done[cell.key] for cell in cells]


def _write_run_json(out: Path, spec: SweepSpec, argv: list[str] | None) -> None:
    """run.json: this invocation, with every earlier one under `history` (called under the folder's
    lock). An unreadable run.json is kept aside as run.json.unreadable-<time>, never dropped."""
    path = out / store.RUN
    history: list[Any] = []
    if path.exists():
        previous = store.read_run_json(path)
        if previous is None:
            aside = path.with_name(f"{store.RUN}.unreadable-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
            path.replace(aside)
            history = [{"unreadable_record_moved_to": aside.name}]
        else:
            earlier = previous.pop("history", [])
            history = (earlier if isinstance(earlier, list) else [earlier]) + [previous]
    record = environment(spec, argv)
    record["history"] = history
    tmp = path.with_name(f".{store.RUN}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
