"""The conformance suite every task passes, built in or your own (tasks/):

    check_task("toy[d=2,batch=2]")          # one spec
    check_all_tasks(["toy", "sd[model=tiny]"])

The task is set up once on the CPU; for every target it declares (those its options cannot build,
e.g. `noise` without eta > 0, are n/a with the task's own refusal) problems are made at N = STEPS
and sampled without a graph, as the runner does. It checks:

- declaration: options declared and validated, a summary, targets and a learning rate for each,
  an unknown target and too many steps refused;
- fresh problems: two calls with the same arguments share no leaf (no object, no storage), sample
  the same x_0, and optimising one's leaves in place leaves the other's samples unchanged;
- leaves: exactly the target's tensors (x_N; c; x_N and the injected noises; the denoiser's
  trainable parameters) are the problem's leaves, all leaf tensors requiring grad with no .grad yet,
  and no other tensor the loss depends on requires grad (found by walking the loss's graph: the
  denoiser's and the reward's parameters, the task's tables);
- untimed evaluation: `evaluate(problem, x0)` returns finite numbers with the problem's own mean
  reward as `reward`, and changes no leaf, no .grad, no sample and not the grad mode;
- data fingerprint: a string, equal on a fresh instance before set-up and after problems and
  evaluations;
- images and rewards: `images(problem, x0)` is None or a (B, C, H, W) tensor in [0, 1] without a
  graph; the rewards are B finite numbers;
- float64: where the reference runs in float64, `make_problem(..., dtype=torch.float64)` gives
  float64 leaves and finite float64 samples and rewards; default problems have leaves in `dtype`."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from bench.check import Check, Failed, require, run_check, torch_threads
from bench.errors import SpecError, exception_text
from bench.options import Option

STEPS = 2  # small: the suite checks the contract, not the sampler (bench.check.samplers does)
SEED = 0
PERTURBATION = 0.05  # in-place change of one problem's leaves, relative to (1 + |leaf|)
REWARD_TOLERANCE = 1e-5  # evaluate's reward against the problem's own mean reward, relative
STANDARD = ("latent", "cond", "weights", "noise")  # targets whose leaves the contract names
TASK_CHECKS = (
    "set-up",
    "declaration",
    "fresh problems per call",
    "the target's leaves and nothing else",
    "untimed evaluation",
    "images and rewards in range",
    "float64 problems",
    "stable data fingerprint",
)


def _sample(problem) -> Tensor:
    return problem.chain.sample(problem.x_start, problem.cond, problem.noises)


def _storage(tensor: Tensor) -> int | None:
    return tensor.untyped_storage().data_ptr() if tensor.numel() else None


def _graph_leaves(root: Tensor) -> list[Tensor]:
    """Every tensor requiring grad that `root` depends on (its graph's AccumulateGrad nodes)."""
    found, seen, stack = {}, set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            found[id(variable)] = variable
        stack.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())


class TaskSuite:
    def __init__(self, spec: str, steps: int = STEPS, targets: list[str] | None = None, device: str = "cpu") -> None:
        from bench.registry import TASKS

        self.spec, self.steps, self.only = spec, steps, targets
        self.checks: list[Check] = []
        self.task = None
        self.cls = TASKS.get(spec.split("[")[0])
        self.device = torch.device(device)
        self.served: list[str] = []
        self.unserved: dict[str, str] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> None:
        run_check(self.checks, self.spec, name, fn)

    def fresh_task(self):
        from bench.registry import TASKS

        return TASKS.create(self.spec)

    def _problem(self, target: str, dtype: torch.dtype | None = None):
        return (
            self.task.make_problem(target, self.steps, SEED, dtype)
            if dtype is not None
            else self.task.make_problem(target, self.steps, SEED)
        )

    def _each_target(self, fn: Callable[[str], str]) -> str:
        require(bool(self.served), "no target served (see the set-up check)")
        results, failures = [], []
        for target in self.served:
            try:
                results.append(f"{target}: {fn(target)}")
            except Failed as exc:
                failures.append(f"{target}: {exc}")
            except Exception as exc:
                failures.append(f"{target}: {type(exc).__name__}: {exception_text(exc)}")
        require(not failures, "; ".join(failures))
        return "; ".join(results)

    # -- the checks ---------------------------------------------------------------------------
    def setup(self) -> str:
        self.task = self.fresh_task()
        self.task.preflight()
        self.task.setup(self.device)
        for target in self.task.targets:
            if self.only is not None and target not in self.only:
                continue
            try:
                self.task.check_target(target)
                self.task.check_steps(self.steps)
                self.task.check_point(target, self.steps)
            except SpecError as exc:
                self.unserved[target] = str(exc)
                continue
            self.served.append(target)
        require(bool(self.served), f"its options build no target: {self.unserved}")
        skipped = "; ".join(f"{t} n/a ({why})" for t, why in self.unserved.items())
        return f"targets {', '.join(self.served)} at N={self.steps}" + (f"; {skipped}" if skipped else "")

    def declaration(self) -> str:
        from bench.registry import TASKS

        cls = self.cls
        names = [opt.name for opt in cls.options]
        require(len(set(names)) == len(names), f"duplicate option names {names}")
        for opt in cls.options:
            require(isinstance(opt, Option), f"{opt!r} is not a bench.options.Option")
            require(opt.type in (int, float, bool, str), f"option {opt.name}: type {opt.type} unsupported")
            require(bool(opt.help), f"option {opt.name} has no help text")
            if opt.default is not None:
                opt.parse(opt.default, cls.name)
        try:
            TASKS.create(f"{cls.name}[no_such_option=1]")
            raise Failed("an unknown option was accepted")
        except SpecError:
            pass
        require(bool(cls.summary), "no summary (shown by `python -m bench list`)")
        require(
            bool(self.task.targets) and all(isinstance(t, str) and t for t in self.task.targets),
            f"targets {self.task.targets!r}",
        )
        missing = [t for t in self.served if t not in self.task.learning_rates]
        require(not missing, f"no learning rate for {', '.join(missing)} (learning_rates)")
        require(
            isinstance(self.task.dtype, torch.dtype),
            f"the task's dtype is {self.task.dtype!r}, not a torch.dtype"
            + (
                " (its option `dtype` shadows Task.dtype, the precision of the estimators' runs)"
                if "dtype" in names
                else ""
            ),
        )
        for bad in ("no-such-target",):
            try:
                self.task.check_target(bad)
                raise Failed(f"target {bad!r} was accepted")
            except SpecError:
                pass
        train = self.task.train_timesteps
        if train is not None:
            try:
                self.task.check_steps(train + 1)
                raise Failed(f"N = {train + 1} steps accepted, beyond the {train} training timesteps")
            except SpecError:
                pass
        return f"{len(names)} option(s); targets {', '.join(self.task.targets)}"

    def fresh(self) -> str:
        def check(target: str) -> str:
            one, two = self._problem(target), self._problem(target)
            shared = [k for k, leaf in enumerate(one.leaves) if any(leaf is other for other in two.leaves)]
            require(not shared, f"two calls share leaf object(s) {shared[:4]} (of {len(one.leaves)})")
            storages = {_storage(leaf) for leaf in two.leaves} - {None}
            overlapping = [k for k, leaf in enumerate(one.leaves) if _storage(leaf) in storages]
            require(
                not overlapping, f"two calls' leaves share memory: leaf(s) {overlapping[:4]} are views of one tensor"
            )
            first, second = _sample(one), _sample(two)
            require(
                torch.equal(first, second),
                f"the same (target, N, seed) sampled different x_0 (by {float((first - second).abs().max()):.2e})",
            )
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for leaf in one.leaves:  # what an optimiser's step does
                    change = torch.randn(leaf.shape, generator=generator).to(leaf)
                    leaf.add_(PERTURBATION * (1 + leaf.abs()) * change)
            moved, after = _sample(one), _sample(two)
            require(
                torch.equal(after, second),
                "optimising one problem's leaves changed another problem's samples "
                f"(by {float((after - second).abs().max()):.2e}): state shared between calls",
            )
            if torch.equal(moved, first):
                return f"{len(one.leaves)} leaves apart (changing them left their own samples unchanged)"
            return f"{len(one.leaves)} leaves apart"

        return self._each_target(check)

    def leaves(self) -> str:
        def check(target: str) -> str:
            problem = self._problem(target)
            leaves = problem.leaves
            require(isinstance(leaves, list) and len(leaves) > 0, f"leaves {type(leaves).__name__} of {len(leaves)}")
            require(len({id(leaf) for leaf in leaves}) == len(leaves), "a tensor appears twice among the leaves")
            for k, leaf in enumerate(leaves):
                require(isinstance(leaf, Tensor) and leaf.is_floating_point(), f"leaf {k} is not a floating tensor")
                require(
                    leaf.requires_grad and leaf.is_leaf,
                    f"leaf {k} "
                    + (
                        "does not require grad"
                        if not leaf.requires_grad
                        else "is not a leaf tensor (it has a grad_fn: an optimiser cannot step it)"
                    ),
                )
                require(leaf.grad is None, f"leaf {k} of a fresh problem already has a .grad")
            ids = {id(leaf) for leaf in leaves}
            chain = problem.chain
            expected = {
                "latent": [problem.x_start],
                "cond": [problem.cond],
                "noise": [problem.x_start, *(problem.noises or [])],
                "weights": [p for p in chain.denoiser.parameters() if p.requires_grad],
            }.get(target)
            if expected is not None:
                if target == "weights":
                    require(bool(expected), "no denoiser parameter requires grad for the weights target")
                missing = sum(1 for t in expected if t is None or id(t) not in ids)
                extra = len(ids - {id(t) for t in expected if t is not None})
                require(
                    not missing and not extra,
                    f"the leaves are not {target}'s tensors: {missing} of "
                    f"{len(expected)} missing, {extra} other tensor(s) among them",
                )
            named = [
                ("x_N", problem.x_start),
                ("cond", problem.cond),
                *((f"noise {i + 1}", t) for i, t in enumerate(problem.noises or [])),
                *((f"denoiser parameter {n}", p) for n, p in chain.denoiser.named_parameters()),
                *((f"denoiser buffer {n}", b) for n, b in chain.denoiser.named_buffers()),
            ]
            stray = [name for name, t in named if isinstance(t, Tensor) and t.requires_grad and id(t) not in ids]
            require(
                not stray,
                f"requires grad but is not a leaf of the target: {', '.join(stray[:3])}"
                + (f" (+{len(stray) - 3})" if len(stray) > 3 else ""),
            )
            state = chain.schedule.start(problem.x_start)  # the loss with a graph, as an estimator builds it
            for i in range(chain.schedule.num_steps, 0, -1):
                state = chain.advance(state, i, problem.cond, problem.noises)
            loss, _ = problem.loss(state[0])
            require(loss.requires_grad, "the loss does not depend on the leaves")
            reached = _graph_leaves(loss)
            outside = [tuple(t.shape) for t in reached if id(t) not in ids]
            require(
                not outside,
                f"the loss depends on {len(outside)} tensor(s) requiring grad outside the leaves "
                f"(shapes {outside[:3]}): a reward or model parameter left trainable?",
            )
            unreached = len(ids - {id(t) for t in reached})
            del state, loss
            return f"{len(leaves)} leaves" + (f" ({unreached} not reached by the loss)" if unreached else "")

        return self._each_target(check)

    def evaluation(self) -> str:
        def check(target: str) -> str:
            problem = self._problem(target)
            x0 = _sample(problem)
            for leaf in problem.leaves:
                leaf.grad = torch.full_like(leaf, 0.25)  # a gradient an estimator left
            values = [leaf.detach().clone() for leaf in problem.leaves]
            x0_before, grad_mode = x0.clone(), torch.is_grad_enabled()
            _, rewards = problem.loss(x0)
            own_reward = float(rewards.detach().mean())
            metrics = self.task.evaluate(problem, x0)
            require(torch.is_grad_enabled() == grad_mode, "evaluate changed the grad mode")
            require(isinstance(metrics, dict) and metrics, f"evaluate returned {type(metrics).__name__}, not a dict")
            bad = [
                f"{k}={v!r}"
                for k, v in metrics.items()
                if not isinstance(k, str)
                or isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
            ]
            require(not bad, f"not finite numbers: {', '.join(bad[:4])}")
            require("reward" in metrics, f"no 'reward' among {', '.join(sorted(metrics))}")
            gap = abs(metrics["reward"] - own_reward)
            require(
                gap <= REWARD_TOLERANCE * max(1.0, abs(own_reward)),
                f"reward {metrics['reward']:.9g}, the problem's own mean reward {own_reward:.9g}",
            )
            changed = [k for k, (leaf, value) in enumerate(zip(problem.leaves, values)) if not torch.equal(leaf, value)]
            require(not changed, f"evaluate changed leaf/leaves {changed[:4]}")
            grads = [
                k for k, leaf in enumerate(problem.leaves) if leaf.grad is None or not bool((leaf.grad == 0.25).all())
            ]
            require(not grads, f"evaluate changed the .grad of leaf/leaves {grads[:4]}")
            require(torch.equal(x0, x0_before), "evaluate changed the samples it was given in place")
            require(torch.equal(_sample(problem), x0_before), "after evaluate the problem samples another x_0")
            return f"{len(metrics)} metric(s): {', '.join(sorted(metrics))}"

        return self._each_target(check)

    def fingerprint(self) -> str:
        before = self.fresh_task().data_fingerprint()  # a fresh instance, not set up
        require(isinstance(before, str), f"data_fingerprint() returned {type(before).__name__}, not a str")
        first, second = self.task.data_fingerprint(), self.task.data_fingerprint()
        require(first == second, f"two calls gave {first!r} and {second!r}")
        require(first == before, f"{before!r} before set-up, {first!r} after set-up and problems")
        return f"{first!r}" if first else "'' (no data files)"

    def images(self) -> str:
        def check(target: str) -> str:
            problem = self._problem(target)
            x0 = _sample(problem)
            _, rewards = problem.loss(x0)
            batch = x0.shape[0]
            require(
                isinstance(rewards, Tensor) and tuple(rewards.shape) == (batch,),
                f"rewards of shape {tuple(getattr(rewards, 'shape', ()))}, expected ({batch},)",
            )
            require(bool(torch.isfinite(rewards).all()), f"non-finite rewards {rewards.tolist()[:4]}")
            images = self.task.images(problem, x0)
            if images is None:
                return "rewards finite; no images"
            require(
                isinstance(images, Tensor) and images.ndim == 4 and images.shape[0] == batch,
                f"images of shape {tuple(getattr(images, 'shape', ()))}, expected ({batch}, C, H, W)",
            )
            require(images.is_floating_point() and bool(torch.isfinite(images).all()), "non-finite or integer images")
            low, high = float(images.min()), float(images.max())
            require(0.0 <= low and high <= 1.0, f"images in [{low:.4g}, {high:.4g}], not [0, 1]")
            require(images.grad_fn is None and not images.requires_grad, "images carry an autograd graph")
            return f"rewards finite; images {tuple(images.shape)} in [{low:.2f}, {high:.2f}]"

        return self._each_target(check)

    def float64(self):
        if self.task.reference_dtype is not torch.float64:
            return "n/a", f"reference_dtype is {self.task.reference_dtype}, not float64"

        def check(target: str) -> str:
            if isinstance(self.task.dtype, torch.dtype):  # (else the declaration check fails)
                dtypes = sorted({str(leaf.dtype) for leaf in self._problem(target).leaves})
                require(
                    dtypes == [str(self.task.dtype)],
                    f"default leaves in {', '.join(dtypes)}, the task's dtype is {self.task.dtype}",
                )
            problem = self._problem(target, torch.float64)
            dtypes = sorted({str(leaf.dtype) for leaf in problem.leaves})
            require(dtypes == ["torch.float64"], f"dtype=float64 gave leaves in {', '.join(dtypes)}")
            x0 = _sample(problem)
            require(x0.dtype == torch.float64, f"float64 problem sampled {x0.dtype}")
            require(bool(torch.isfinite(x0).all()), "non-finite float64 samples")
            _, rewards = problem.loss(x0)
            require(bool(torch.isfinite(rewards).all()), "non-finite float64 rewards")
            return "float64 leaves and samples"

        return self._each_target(check)


def check_task(spec: str, steps: int = STEPS, targets: list[str] | None = None, threads: int | None = 1) -> list[Check]:
    """Every check of the task suite on one task spec (see the module); `targets` narrows them.
    It runs on `threads` CPU threads (None: torch's setting), restored afterwards."""
    with torch_threads(threads):
        return _check_task(spec, steps, targets)


def _check_task(spec: str, steps: int, targets: list[str] | None) -> list[Check]:
    suite = TaskSuite(spec, steps, targets)
    suite.run("set-up", suite.setup)
    if suite.checks[-1].status == "fail":
        return suite.checks + [Check(spec, name, "n/a", "not set up") for name in TASK_CHECKS[1:]]
    for name, fn in zip(
        TASK_CHECKS[1:],
        (
            suite.declaration,
            suite.fresh,
            suite.leaves,
            suite.evaluation,
            suite.images,
            suite.float64,
            suite.fingerprint,
        ),
    ):
        suite.run(name, fn)  # the fingerprint last: after problems and evaluations
    return suite.checks


def check_all_tasks(specs: list[str] | None = None) -> list[Check]:
    """The suite on each spec (default: every registered task with its defaults)."""
    from bench.registry import TASKS

    specs = list(specs or TASKS.names())
    for spec in specs:
        TASKS.create(spec)  # a bad name or option is a SpecError before anything runs
    return [check for spec in specs for check in check_task(spec)]


def print_task_checks(checks: list[Check], console: Any) -> None:
    from bench.check import print_checks

    print_checks(checks, console, f"Task conformance (CPU, N = {STEPS})", "task")
