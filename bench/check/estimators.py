"""The conformance suite every estimator passes, built in or your own:

    python -m bench check                      # every registered estimator
    python -m bench check my-est --include my_estimator.py

On the float64 toy (deterministic and stochastic sampler, every target) it checks the contract:
options declared and validated, gradients only on the requested leaves, no stale `.grad`
accumulated across calls, counts equal to the cost model where it predicts whole numbers, skip
reasons that are real strings, agreement with the exact gradient (reported; required for an
estimator that declares itself exact), the same gradient under the same seed, a declared convergence order, and nothing left
behind (no graph on what it returns, no tensors piling up over repeated calls)."""

from __future__ import annotations

import gc
import math
import random
import warnings
from typing import Any, Callable

import torch

from bench.check import Check, Failed, require, run_check
from bench.check import print_checks as print_suite
from bench.errors import SkipCell, SpecError
from bench.options import Option, parse_spec
from bench.problem import Problem
from bench.registry import ESTIMATORS, TASKS

TOYS = ("toy[d=3,batch=6]", "toy[d=3,batch=6,eta=1.0]")  # the deterministic and the stochastic sampler
STEPS = 4
EXACT_TOLERANCE = 1e-8
COUNT_CALLS = 6  # counts are averaged over this many calls (a multiple of reuse cycles of 1, 2, 3 and 6)
ORDER_STEPS = (10, 20, 50, 100)  # N for the convergence-order fit (dividing T = 1000: DDIM is Euler there)
ORDER_SLACK = 0.25  # a declared order p passes with a fitted slope >= p - ORDER_SLACK


class Suite:
    def __init__(self, spec: str, toys: tuple[str, ...] = TOYS) -> None:
        """The suite of estimator `spec` on `toys`: a deterministic task spec first, then one with
        injected noise (eta > 0); a plug-in's own task where its estimator needs what the toy
        does not provide."""
        self.spec, self.toys = spec, tuple(toys)
        self.cls = ESTIMATORS.get(spec.split("[")[0])
        self.checks: list[Check] = []
        self.tasks = {}
        for toy in self.toys:
            task = TASKS.create(toy)
            task.setup(torch.device("cpu"))
            self.tasks[toy] = task
        self.served: dict[str, str] = {}  # target -> the first toy whose problems the estimator serves

    def estimator(self):
        return ESTIMATORS.create(self.spec)

    def run(self, name: str, fn: Callable[[], str | None]) -> None:
        run_check(self.checks, self.spec, name, fn)

    # -- the checks ---------------------------------------------------------------------------
    def options(self) -> str:
        names = [opt.name for opt in self.cls.options]
        require(len(set(names)) == len(names), f"duplicate option names {names}")
        for opt in self.cls.options:
            require(isinstance(opt, Option), f"{opt!r} is not a bench.options.Option")
            require(opt.type in (int, float, bool, str), f"option {opt.name}: type {opt.type} unsupported")
            require(opt.help, f"option {opt.name} has no help text")
            opt.parse(opt.default, self.cls.name)  # the default itself is valid
        try:
            ESTIMATORS.create(f"{self.cls.name}[no_such_option=1]")
            raise Failed("an unknown option was accepted")
        except SpecError:
            pass
        require(bool(self.cls.summary), "no summary (shown by `python -m bench list`)")
        return f"{len(names)} option(s): {', '.join(names) or 'none'}"

    def skips(self) -> str:
        estimator, notes = self.estimator(), {}
        for target in ("latent", "cond", "weights", "noise"):
            for toy, task in self.tasks.items():
                if target == "noise" and not task.eta > 0:
                    continue  # the deterministic sampler has no injected noise to optimise
                problem = task.make_problem(target, STEPS, 0)
                reason = estimator.applies(problem)  # its requirements and needs too (bench/capabilities.py)
                require(
                    reason is None or (isinstance(reason, str) and reason.strip()),
                    f"skip_reason returned {reason!r}: None or a sentence",
                )
                if reason is None:
                    self.served.setdefault(target, toy)
                else:
                    notes.setdefault(reason, []).append(f"{target} (eta={'1' if 'eta' in toy else '0'})")
        require(bool(self.served), "skips every target on both samplers")
        return (
            "; ".join(f"skips {', '.join(where)}: {reason}" for reason, where in notes.items()) or "serves every target"
        )

    def _each_target(self, fn: Callable[[str, str], str]) -> str:
        require(bool(self.served), "no target served (see the skip check)")
        return "; ".join(f"{target}: {fn(target, toy)}" for target, toy in self.served.items())

    def _fresh(self, toy: str, target: str, seed: int = 0, steps: int = STEPS) -> Problem:
        return self.tasks[toy].make_problem(target, steps, seed)

    def _call(self, problem: Problem, rng_seed: int = 0, estimator=None, rng: random.Random | None = None):
        """One call (a fresh estimator and rng unless given); SkipCell at run time is a failure."""
        try:
            return (estimator or self.estimator())(problem, rng or random.Random(rng_seed))
        except SkipCell as skip:
            raise Failed(f"raised SkipCell at run time ({skip}); report it from skip_reason") from None

    def _against_reference(self, toy: str, target: str, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(this estimator's gradient, the exact one, the reference's spec) on a fresh problem."""
        reference = self.estimator().reference_spec()  # "full", or the exact gradient of its own chain
        problem = self._fresh(toy, target, steps=steps)
        ESTIMATORS.create(reference)(problem, random.Random(0))
        exact = problem.flat_grad().clone()
        problem = self._fresh(toy, target, steps=steps)
        self._call(problem)
        return problem.flat_grad(), exact, reference

    def leaves(self) -> str:
        def check(target, toy):
            problem = self._fresh(toy, target)
            outcome = self._call(problem)
            others = [
                ("x_N", problem.x_start),
                ("cond", problem.cond),
                *((f"weight {n}", p) for n, p in problem.chain.denoiser.named_parameters()),
                *((f"noise {i}", t) for i, t in enumerate(problem.noises or [])),
            ]
            leaf_ids = {id(leaf) for leaf in problem.leaves}
            stray = [name for name, t in others if t is not None and id(t) not in leaf_ids and t.grad is not None]
            require(not stray, f"gradient on tensors that are not the target's: {stray[:3]}")
            for leaf in problem.leaves:
                require(leaf.grad is not None, "a target leaf got no .grad (set zeros if that is the estimate)")
                require(leaf.grad.shape == leaf.shape, f".grad shape {tuple(leaf.grad.shape)} != {tuple(leaf.shape)}")
                require(leaf.grad.grad_fn is None, ".grad carries an autograd graph")
                require(bool(torch.isfinite(leaf.grad).all()), "non-finite gradient")
            require(float(problem.flat_grad().norm()) > 0, "all-zero gradient (use skip_reason instead)")
            require(
                outcome.x0.grad_fn is None and outcome.rewards.grad_fn is None,
                "the returned x0 or rewards still hold a graph",
            )
            require(math.isfinite(outcome.loss), f"loss {outcome.loss}")
            return "ok"

        return self._each_target(check)

    def no_accumulation(self) -> str:
        def check(target, toy):
            problem = self._fresh(toy, target)
            estimator = self.estimator()
            estimator(problem, random.Random(3))
            first = problem.flat_grad().clone()
            second_estimator = self.estimator()
            second_estimator(problem, random.Random(3))  # same draws again on the same problem
            require(
                torch.allclose(problem.flat_grad(), first, rtol=1e-10, atol=0),
                "a second call on the same problem changed the gradient: stale .grad accumulated?",
            )
            return "ok"

        return self._each_target(check)

    def counts(self) -> str:
        """Counts per call, averaged over COUNT_CALLS calls of one estimator on one problem (an
        estimator that reuses samples across calls is modelled by its average). Where the model
        predicts whole numbers per call, they must match exactly; otherwise (random choices) the
        counts are reported."""

        def check(target, toy):
            problem, estimator, rng = self._fresh(toy, target), self.estimator(), random.Random(0)
            problem.chain.counter.reset()
            for _ in range(COUNT_CALLS):
                self._call(problem, estimator=estimator, rng=rng)
            measured = (problem.chain.counter.forward / COUNT_CALLS, problem.chain.counter.vjp / COUNT_CALLS)
            cost = estimator.cost_for(problem)
            predicted = (cost.nfe_forward, cost.nfe_vjp)
            shown = f"{measured[0]:g}/{measured[1]:g}"
            whole = all(abs(p * COUNT_CALLS - round(p * COUNT_CALLS)) < 1e-6 for p in predicted)
            if whole and not estimator.random_counts:
                require(
                    all(abs(m - p) < 1e-9 for m, p in zip(measured, predicted)),
                    f"counted fwd/vjp {shown} per call, cost model says {predicted[0]:g}/{predicted[1]:g}",
                )
                return f"{shown} as predicted"
            return f"{shown} (expected {predicted[0]:g}/{predicted[1]:g}: random)"

        return self._each_target(check)

    def convergence(self):
        """A declared convergence order p (the error to the exact gradient falls like N^-p): the
        least-squares slope of log error against log N over ORDER_STEPS must reach p - ORDER_SLACK."""
        order = self.estimator().convergence_order
        if order is None:
            return "n/a", "no convergence order declared"
        toy = self.toys[0]

        def check(target, _):
            errors = []
            for steps in ORDER_STEPS:
                grad, exact, _ = self._against_reference(toy, target, steps)
                errors.append(float((grad - exact).norm() / exact.norm()))
            logs_n = [math.log(n) for n in ORDER_STEPS]
            logs_e = [math.log(max(e, 1e-300)) for e in errors]
            mean_n, mean_e = sum(logs_n) / len(logs_n), sum(logs_e) / len(logs_e)
            slope = -sum((a - mean_n) * (b - mean_e) for a, b in zip(logs_n, logs_e)) / sum(
                (a - mean_n) ** 2 for a in logs_n
            )
            require(
                slope >= order - ORDER_SLACK,
                f"declared order {order:g}, measured {slope:.2f} (errors {', '.join(f'{e:.1e}' for e in errors)})",
            )
            return f"order {slope:.2f} (declared {order:g})"

        targets = [t for t, where in self.served.items() if where == toy]
        require(bool(targets), "declares a convergence order but serves no target on the deterministic toy")
        return "; ".join(f"{t}: {check(t, toy)}" for t in targets)

    def agreement(self):
        def check(target, toy):
            grad, exact, reference = self._against_reference(toy, target)
            err = float((grad - exact).norm() / exact.norm())
            cos = float(grad @ exact / (grad.norm() * exact.norm()))
            if self.estimator().exact:
                require(err < EXACT_TOLERANCE, f"declared exact, but rel. error {err:.2e} to {reference}")
            return f"cos {cos:.3f}, rel err {err:.1e}" + ("" if reference == "full" else f" (to {reference})")

        return self._each_target(check)

    def determinism(self) -> str:
        def check(target, toy):
            grads = []
            for _ in range(2):
                problem = self._fresh(toy, target)
                self._call(problem, rng_seed=11)
                grads.append(problem.flat_grad())
            require(torch.equal(*grads), "two runs with the same seed gave different gradients")
            return "ok"

        return self._each_target(check)

    def nothing_left_behind(self) -> str:
        target, toy = next(iter(self.served.items()))
        problem = self._fresh(toy, target)
        estimator, rng = self.estimator(), random.Random(0)

        def live_tensors() -> int:
            gc.collect()
            with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
                warnings.simplefilter("ignore")
                return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

        # Objects that exist now cannot be what these calls leak: frozen, the collections and the
        # census below skip them (a full pass over a test session's heap costs a second a spec).
        gc.collect()
        gc.freeze()
        try:
            for _ in range(COUNT_CALLS):  # whole reuse cycles, so that no cycle is held half-way
                estimator(problem, rng)
            before = live_tensors()
            for _ in range(2 * COUNT_CALLS):
                estimator(problem, rng)
            growth = live_tensors() - before
        finally:
            gc.unfreeze()
        require(growth <= 4, f"{growth} more live tensors after {2 * COUNT_CALLS} more calls (a graph or a hook kept?)")
        return f"{target}: {growth:+d} live tensors over {2 * COUNT_CALLS} calls"


def check_estimator(spec: str, toys: tuple[str, ...] = TOYS) -> list[Check]:
    suite = Suite(spec, toys)
    suite.run("options declared and validated", suite.options)
    suite.run("skip reasons", suite.skips)
    suite.run("gradients on the target's leaves only", suite.leaves)
    suite.run("no stale .grad across calls", suite.no_accumulation)
    suite.run("counts match the cost model", suite.counts)
    suite.run("agreement with the exact gradient" + (" (required)" if suite.estimator().exact else ""), suite.agreement)
    suite.run("declared convergence order", suite.convergence)
    suite.run("same seed, same gradient", suite.determinism)
    suite.run("nothing left behind", suite.nothing_left_behind)
    return suite.checks


def variant_specs(spec: str) -> list[str]:
    """A bare name: the estimator with its defaults and every variant it declares (`variants`, option
    strings worth checking, as diffusers' scheduler tests run one check across configurations). A
    spec with options: that spec alone."""
    name, values = parse_spec(spec)
    cls = ESTIMATORS.get(name)
    if values:
        return [spec]
    return [cls.name] + [f"{cls.name}[{variant}]" for variant in cls.variants]


def check_all(specs: list[str] | None = None, toys: tuple[str, ...] | None = None) -> list[Check]:
    specs = [variant for spec in (specs or ESTIMATORS.names()) for variant in variant_specs(spec)]
    for spec in specs:
        ESTIMATORS.create(spec)  # a bad name or option is a SpecError before anything runs
    for toy in toys or ():
        TASKS.create(toy)
    return [check for spec in specs for check in check_estimator(spec, tuple(toys or TOYS))]


def print_checks(checks: list[Check], console: Any) -> None:
    print_suite(checks, console, "Conformance (toy, float64, N = 4)", "estimator")
