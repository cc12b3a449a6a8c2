"""The task contract: set up once (untimed), build a fresh Problem per (target, N, seed),
evaluate samples (untimed)."""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.chain import Schedule
from bench.errors import SpecError
from bench.options import Configurable, Option
from bench.problem import TARGET_INFO, TARGETS, Problem

DEFAULT_SAMPLERS = {"epsilon": "ddim", "flow": "flow-euler"}


def sampler_option() -> Option:
    """The `sampler` option a task declares: a sampler spec from bench/samplers ('' = the model's own)."""
    from bench.samplers import check_sampler_spec

    return Option(
        "sampler",
        str,
        "",
        "the sampler: ddim, dpmpp2m[order=1|2], flow-euler[shift=s] "
        "(empty: ddim for epsilon models, flow-euler for flow models)",
        check=check_sampler_spec,
        metavar="name[k=v]",
    )


class Task(Configurable):
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    version: ClassVar[str] = "1"  # bump when results change meaning; part of every row's key
    options: ClassVar[tuple[Option, ...]] = ()
    targets: ClassVar[tuple[str, ...]] = TARGETS
    dtype: ClassVar[torch.dtype] = torch.float32  # precision of the estimators' runs
    learning_rates: ClassVar[dict[str, float]] = {"latent": 0.05, "cond": 0.05, "weights": 1e-3, "noise": 0.05}
    eta: float = 0.0  # tasks with an eta option override it
    train_timesteps: ClassVar[int | None] = None  # the model's training steps T (a bound on N), if known
    # The exact reference gradient: backprop in this precision (None: no agreement measured), and
    # whether it is checkpointed (where a full graph does not fit: SD-class models).
    reference_dtype: ClassVar[torch.dtype | None] = torch.float64
    reference_checkpointed: ClassVar[bool] = False

    def __init__(self, **values) -> None:
        super().__init__(**values)
        if getattr(self, "sampler", ""):  # one spelling per sampler, so one cell key
            from bench.samplers import make_sampler

            self.sampler = self.values["sampler"] = make_sampler(self.sampler).spec

    def preflight(self) -> None:
        """Cheap checks of the options before anything runs (a missing folder, say): SpecError.
        Subclasses that override it call super().preflight()."""
        sampler = self.chosen_sampler()
        try:
            config = self.scheduler_config()
        except NotImplementedError:  # a task that builds its schedules otherwise
            return
        problem = sampler.config_problem(config)
        if problem:
            raise SpecError(f"{self.spec}: {problem}")

    # --- the sampler (tasks that declare sampler_option()) --------------------------------------
    @property
    def model_prediction(self) -> str:
        """What the task's model outputs: epsilon or flow (bench.samplers.PREDICTIONS)."""
        return "epsilon"

    def scheduler_config(self) -> dict:
        """The diffusers scheduler configuration of the model's noise table (training steps, betas)."""
        raise NotImplementedError

    def chosen_sampler(self):
        """The sampler of this task's options, checked against the model and eta (SpecError)."""
        from bench.samplers import make_sampler

        spec = getattr(self, "sampler", "") or DEFAULT_SAMPLERS[self.model_prediction]
        sampler = make_sampler(spec)
        sampler.check_model(self.model_prediction, self.spec)
        if self.eta > 0 and not sampler.stochastic:
            raise SpecError(
                f"{self.spec}: eta={self.eta} needs a stochastic sampler; sampler "
                f"{sampler.spec} is deterministic (eta > 0 applies to ddim)"
            )
        return sampler

    def code_objects(self) -> tuple:
        """What the task runs beyond its own class, resolved by name at run time (its sampler;
        a task with a reward by name adds the reward): their code is in every cell's key."""
        if not hasattr(self, "sampler"):
            return ()
        return (type(self.chosen_sampler()),)

    def make_schedule(self, steps: int) -> Schedule:
        """The N-step schedule of the task's sampler on its model's noise table."""
        return self.chosen_sampler().schedule(self.scheduler_config(), steps, self.eta)

    def offers(self) -> dict[str, object]:
        """What this task can attach to its problems' `extras` for estimators that need it, by
        name (bench/capabilities.py), with what an estimator may check before anything runs (e.g.
        the step counts of the few-step chains it ships); none by default."""
        return {}

    def check_steps(self, steps: int) -> None:
        """SpecError if the sampler cannot take `steps` steps (more than the model's training steps)."""
        if self.train_timesteps is not None and steps > self.train_timesteps:
            raise SpecError(
                f"step count {steps} exceeds the {self.train_timesteps} training timesteps "
                f"of task {self.spec}; valid: 1..{self.train_timesteps}"
            )

    def data_fingerprint(self) -> str:
        """A digest of the data files (trained weights) the task loads, part of every cell's key,
        so that retrained weights never reuse old rows. Empty for tasks without files."""
        return ""

    def check_target(self, target: str) -> None:
        """SpecError unless this task can build problems for `target`."""
        if target not in self.targets and target not in TARGETS:
            from bench.registry import TASKS

            owners = [name for name in TASKS.names() if target in TASKS.get(name).targets]  # registers theirs
            info = TARGET_INFO.get(target)
            if info is not None and info.needs:
                raise SpecError(
                    f"target {target!r} needs {info.needs}; task {self.spec} has none; tasks with "
                    f"{target}: {', '.join(owners) or 'none'}; its targets: {', '.join(self.targets)}"
                )
        if target not in self.targets:
            raise SpecError(f"unknown target {target!r} for task {self.spec}; valid: {', '.join(self.targets)}")
        if target == "noise" and not self.eta > 0:
            raise SpecError(f"target 'noise' needs a stochastic sampler: set eta > 0, e.g. {self.name}[eta=1.0]")

    def check_point(self, target: str, steps: int) -> None:
        """SpecError if `target` cannot be built at `steps` steps (after check_target, check_steps)."""

    def leaves_for(self, target: str, x_start, cond, noises, denoiser) -> list:
        """The tensors an estimator differentiates for `target` (made to require grad)."""
        leaves = {
            "latent": [x_start],
            "cond": [cond],
            "noise": [x_start, *(noises or [])],
            "weights": [p for p in denoiser.parameters() if p.requires_grad],
        }[target]
        for leaf in leaves:
            leaf.requires_grad_(True)
        return leaves

    def setup(self, device: torch.device) -> None:
        """Load or train-and-cache what the task needs. Called once per sweep, untimed."""
        self.device = device

    def make_problem(self, target: str, steps: int, seed: int, dtype: torch.dtype | None = None) -> Problem:
        """A fresh problem (fresh copies of anything an optimiser will change)."""
        raise NotImplementedError

    def images(self, problem: Problem, x0: torch.Tensor) -> torch.Tensor | None:
        """Final samples as images (B, C, H, W) in [0, 1] for the run folder's sample grids, or
        None where samples are not images (the toy)."""
        return None

    def quality_reference(self, target: str | None = None) -> str | None:
        """What the quality metrics compare samples with (a row's `eval_reference`), or None."""
        return None

    def quality_floor(self, target: str | None = None) -> dict[str, float]:
        """Metrics of real images against real images (`eval_<name>_floor`), computed once per
        sweep: the best value samples could reach. Empty where the task has no real images."""
        return {}

    def evaluate(self, problem: Problem, x0: torch.Tensor) -> dict[str, float]:
        """Metrics of final samples, outside any timed part."""
        _, rewards = problem.loss(x0)
        return {"reward": float(rewards.mean())}
