"""Samplers: each one a file here, registered by name with `name[k=v]` options, chosen per task
(`digits[sampler=dpmpp2m]`) and recorded in every row (`sampler`).

A sampler turns a task's diffusers scheduler configuration (its training noise table) into the
diffusers scheduler it stands for, and reads that scheduler's grid at N steps into a `Schedule`
(bench/chain.py): a pure, affine step that estimators can replay, checkpoint and differentiate.

To add one: subclass `Sampler` in a new file (options, `prediction`, `scheduler_class`,
`schedule_from`), add it to SAMPLERS below (or declare it in a package's `diffgrad_bench.samplers`
entry-point group), and test its
trajectory against the diffusers scheduler's own `step` loop (tests/core/test_samplers.py)."""

from __future__ import annotations

from typing import Any, ClassVar

from bench.errors import SpecError
from bench.options import Configurable, Option
from bench.registry import Registry, SAMPLER_GROUP

PREDICTIONS = {
    "epsilon": "noise (epsilon) prediction on a variance-preserving schedule",
    "flow": "velocity prediction of a rectified-flow (flow-matching) model",
}


class Sampler(Configurable):
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    prediction: ClassVar[str] = "epsilon"  # the model output this sampler consumes
    stochastic: ClassVar[bool] = False  # True if it can inject noise (eta > 0)
    scheduler_class: ClassVar[str] = ""  # the diffusers class it reproduces

    def scheduler_config(self) -> dict[str, Any]:
        """What this sampler's options set in the diffusers scheduler's configuration."""
        return {}

    def config_problem(self, config: dict[str, Any]) -> str | None:
        """Why this sampler cannot reproduce a model's scheduler configuration (an option of its
        diffusers scheduler that its step does not take), in one line that says what to do; or
        None. A task's preflight refuses the model with it."""
        return None

    def scheduler(self, config: dict[str, Any]):
        """The diffusers scheduler this sampler reproduces, for a task's noise table `config`."""
        import inspect

        import diffusers

        cls = getattr(diffusers, self.scheduler_class)
        accepted = inspect.signature(cls.__init__).parameters
        keep = {k: v for k, v in dict(config).items() if k in accepted}  # e.g. DDIM's clip_sample is not DPM's
        return cls.from_config({**keep, **self.scheduler_config()})

    def schedule(self, config: dict[str, Any], steps: int, eta: float = 0.0):
        """The N-step Schedule of this sampler on a task's noise table."""
        if eta > 0 and not self.stochastic:
            raise SpecError(
                f"sampler {self.spec} is deterministic: eta={eta} applies to ddim only; set eta=0 or sampler=ddim"
            )
        return self.named(self.schedule_from(self.scheduler(config), steps, eta))

    def schedule_from(self, scheduler, steps: int, eta: float):
        raise NotImplementedError

    def named(self, schedule):
        """The schedule, recording this sampler's spec (what rows say)."""
        object.__setattr__(schedule, "sampler", self.spec)
        return schedule

    def check_model(self, prediction: str, owner: str) -> None:
        """SpecError unless a model with this output type can drive this sampler."""
        if prediction != self.prediction:
            raise SpecError(
                f"{owner}: sampler {self.spec} needs a model with {self.prediction} output "
                f"({PREDICTIONS[self.prediction]}), but this model predicts {prediction}; "
                f"valid samplers: {', '.join(samplers_for(prediction))}"
            )


SAMPLERS = Registry(
    "sampler",
    "bench.samplers:Sampler",
    SAMPLER_GROUP,
    builtins={
        "ddim": "bench.samplers.ddim:DDIM",
        "dpmpp2m": "bench.samplers.dpm_solver:DPMSolverPP",
        "flow-euler": "bench.samplers.flow_euler:FlowEuler",
        "flow-sde": "bench.samplers.flow_sde:FlowSDE",
    },
    aliases={
        "dpmpp": "dpmpp2m",
        "dpm-solver": "dpmpp2m",
        "euler-flow": "flow-euler",
        "flow-match-euler": "flow-euler",
        "flow-grpo-sde": "flow-sde",
    },
)


def make_sampler(spec: str) -> Sampler:
    return SAMPLERS.create(spec)


def samplers_for(prediction: str) -> list[str]:
    return [name for name in SAMPLERS.names() if SAMPLERS.get(name).prediction == prediction]


def check_sampler_spec(spec: str) -> str | None:
    """An Option check for a task's `sampler` option ('' is the model's own default)."""
    if spec == "":
        return None
    try:
        make_sampler(spec)
    except SpecError as exc:
        return f"is not a valid sampler ({exc})"
    return None


def schedule_from_scheduler(scheduler, steps: int, eta: float = 0.0):
    """Dispatch a diffusers scheduler instance to the sampler that reproduces it."""
    for name in SAMPLERS.names():
        sampler = SAMPLERS.get(name)
        if sampler.scheduler_class and type(scheduler).__name__ == sampler.scheduler_class:
            instance = sampler()
            return instance.named(instance.schedule_from(scheduler, steps, eta))
    valid = ", ".join(SAMPLERS.get(n).scheduler_class for n in SAMPLERS.names())
    raise SpecError(f"no sampler reproduces {type(scheduler).__name__}; valid: {valid}")


def check_steps_argument(steps: Any, train: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise SpecError(f"step count must be a positive integer, got {steps!r}")
    if steps > train:
        raise SpecError(f"step count {steps} exceeds the {train} training timesteps")
