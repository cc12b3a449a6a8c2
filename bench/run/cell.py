"""The phases of a cell, each returning its part of the row (a failing phase ends the cell with
its outcome, never the sweep):

  setup      build the problem, check it can be served, the cost model's prediction, and that
             it fits the device's memory (bench/run/fit.py)
  agreement  one untimed gradient: counts, finiteness, cosine to the reference
  reference  the exact gradient at the point (computed once per point, in float64 where possible)
  timing     rounds, interleaved with the point's other cells and with the time model's units
             F, V and H on the task's model (bench/measure/timing.py)
  memory     peak memory of one gradient and the memory model (bench/run/memory.py)
  optimise   a short Adam run with the estimator
  evaluate   quality of the optimised sampler beside the unoptimised one's, and the real floor
  samples    the before/after sample grid of image tasks"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from bench.errors import Diverged, SkipCell
from bench.run.guard import leave_if_forked
from bench.run.limits import Clock, is_user_interrupt, outcome
from bench.run.fit import FitCheck, parse_limit
from bench.run.memory import MemoryMeter
from bench.run.plan import (
    DEFAULT_STABLE_CAP_S,
    IDENTITY_FIELDS,
    REMEASURED,
    Cell,
    SweepSpec,
    reference_estimator,
    timing_threads,
)
from bench.registry import ESTIMATORS
from bench.measure.timing import UNIT_CALLS, paired_ratio, synchronize, time_interleaved, unit_calls, units_from


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


class Attempt:
    """One cell on its way to a row: its clock (limit and phase seconds), the row parts its phases
    returned, and the outcome that ended it early, if any."""

    def __init__(
        self,
        cell: Cell,
        limit: float | None,
        kept: dict[str, Any] | None = None,
        remeasure: frozenset[str] = frozenset(),
    ) -> None:
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
            kept = {
                k: v
                for k, v in self.kept.items()
                if k not in IDENTITY_FIELDS and not any(REMEASURED[what](k) for what in self.remeasure)
            }
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
        self.fit = FitCheck(parse_limit(spec.memory_limit), self.device)
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

    def run_point(
        self,
        cells: list[Cell],
        companions: Iterable[Cell] = (),
        kept: dict[str, dict[str, Any]] | None = None,
        remeasure: frozenset[str] = frozenset(),
    ) -> Iterator[dict[str, Any]]:
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
                    attempt.add(
                        attempt.run(
                            "memory",
                            lambda: self.memory.measure(attempt.cell, attempt.problem, attempt.rng, attempt.cost),
                        )
                    )
                if not attempt.measures("compute"):
                    yield attempt.row()
                    continue
                optimised = attempt.run("optimise", lambda: self._optimise(attempt))
                if optimised is not None:
                    fields, problem, first_x0, x0 = optimised
                    attempt.add(fields)
                    attempt.add(attempt.run("evaluate", lambda: self._evaluate(attempt, problem, x0)))
                    attempt.add(attempt.run("samples", lambda: self._save_samples(attempt.cell, problem, first_x0, x0)))
            yield attempt.row()

    # -- phases ------------------------------------------------------------------------------

    def _setup(self, attempt: Attempt) -> dict[str, Any]:
        cell = attempt.cell
        if id(cell.task) not in self.ready_tasks:
            cell.task.setup(self.device)
            self.ready_tasks.add(id(cell.task))
        problem = cell.task.make_problem(cell.target, cell.steps, cell.seed)
        if cell.target in ("cond", "weights") and not problem.chain.schedule.effective_steps():
            raise SkipCell(
                "every step of this schedule is an identity step (the denoiser's output "
                "has weight 0), so cond and weights do not change the samples"
            )
        reason = cell.estimator.applies(problem)
        if reason:
            raise SkipCell(reason)
        attempt.problem, attempt.cost = problem, cell.estimator.cost_for(problem)
        cost = attempt.cost
        planned = self.fit.fields(cell, problem, cost)  # SkipCell if it is predicted not to fit
        return {
            **planned,
            "sampler": cell.estimator.sampler or problem.chain.schedule.sampler,
            "threads": self.threads,
            "nfe_forward_pred": cost.nfe_forward,
            "nfe_vjp_pred": cost.nfe_vjp,
            "time_pred_checkpointed": cost.checkpointed_forwards,
            "mem_class": cost.memory,
            "mem_pred_activations": cost.activations,
            "mem_pred_latents": cost.latents,
            **cell.estimator.problem_fields(problem),
        }

    def _agreement(self, attempt: Attempt) -> dict[str, Any]:
        problem = attempt.problem
        problem.chain.counter.reset()
        attempt.cell.estimator(problem, attempt.rng)
        grad = problem.flat_grad().detach().double()
        if not _finite(grad):
            raise Diverged("non-finite gradient")
        attempt.grad = grad
        return {
            "nfe_forward": problem.chain.counter.forward,
            "nfe_vjp": problem.chain.counter.vjp,
            "grad_norm": float(grad.norm()),
        }

    def _agreement_to_reference(self, attempt: Attempt) -> dict[str, Any]:
        exact, reference, reference_dtype = self.reference(attempt.cell)
        fields: dict[str, Any] = {"reference": reference, "reference_dtype": reference_dtype}
        if exact is not None:
            grad = attempt.grad
            norm = float(grad.norm() * exact.norm())
            fields["grad_cos"] = float(grad @ exact) / norm if norm > 0 else float("nan")
            fields["grad_rel_err"] = (
                float((grad - exact).norm() / exact.norm()) if float(exact.norm()) > 0 else float("nan")
            )
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
        results = time_interleaved(
            calls,
            self.device,
            rounds=self.spec.rounds,
            threads=self.threads,
            stable=self.spec.stable,
            cap_s=cap,
            warmup=self.spec.warmup,
            fatal=is_user_interrupt,
        )
        units = units_from(results)
        unit_seconds = sum(sum(results[name].seconds) for name in UNIT_CALLS)
        baseline = next(
            (a for a in attempts if a.cell.estimator.spec == self.baseline and results[a.cell.key].error is None), None
        )
        for attempt in attempts:
            attempt.clock.charge("units", unit_seconds / len(attempts))
            result = results[attempt.cell.key]
            if result.error is not None:
                attempt.fail(result.error)
                continue
            attempt.add({**result.summary(), "time_paired": len(attempts) > 1})
            if units is not None:
                attempt.add(
                    {
                        "time_unit_f_s": units["F"],
                        "time_unit_v_s": units["V"],
                        "time_unit_h_s": units["H"],
                        "time_pred_s": attempt.cost.predicted_seconds(units["F"], units["V"], units["H"]),
                    }
                )
            if baseline is not None:
                ratio = paired_ratio(result, results[baseline.cell.key])
                if ratio is not None:
                    attempt.add(
                        {
                            "time_baseline": self.baseline,
                            "time_vs_baseline": ratio["ratio"],
                            **(
                                {"time_vs_baseline_lo": ratio["lo"], "time_vs_baseline_hi": ratio["hi"]}
                                if "lo" in ratio
                                else {}
                            ),
                        }
                    )

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
        fields = {
            "reward_init": curve[0],
            "reward_curve": curve,
            "reward_curve_s": seconds,
            "optim_seconds": elapsed,
            "iters_done": done,
        }
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
        save_image(
            torch.cat([images[0][:shown], images[1][:shown]]).float().cpu(),
            folder / f"{cell.key}.png",
            nrow=shown,
            padding=1,
            pad_value=1.0,
        )
        return {"samples_png": f"samples/{cell.key}.png"}
