"""Will it fit, and what will it cost: every registered estimator's peak memory, FLOPs and time per
gradient on an architecture, from its own cost model (`Estimator.cost`: the coefficients of A and
S, forwards and VJPs) and the units counted under fake tensors (bench/planner/units.py).

Peak memory = weights (the denoiser's and the VAE's; text encoders are run once per prompt set and
left out) + the trainable parameters' gradients and Adam's two moments in float32 + the
estimator's peak (`Cost.predicted_peak_bytes`): its activations (its class in A and S) and the VAE
decode's graph where the estimator backpropagates the reward through it, both at once where it
keeps its calls' graphs from the forward, the larger of the two where it takes the reward's
gradient first and recomputes afterwards (`Cost.activations_at_reward`), and one call's working
memory W where calls without a graph run while a graph is kept (`Cost.working`). FLOPs per gradient = forwards·F + VJPs·V (+ a recomputed
forward per VJP with the denoiser's blocks checkpointed) + one VAE decode (and its backward).
Time = FLOPs at a stated sustained throughput, or forwards·F + VJPs·V (+ the VAE decode) from F
and V measured on the present device (bench/planner/timed.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.errors import SpecError
from bench.planner.models import Architecture
from bench.planner.timed import MeasuredUnits
from bench.planner.units import DTYPES, Units, units
from bench.results.summary import format_bytes as size

GIB = 1024**3
TARGETS = {"latent": "input", "cond": "input", "lora": "lora", "full": "full"}
COST_TARGET = {"latent": "latent", "cond": "cond", "lora": "weights", "full": "weights"}
ADAM_BYTES = 8  # two float32 moments per trainable parameter


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '141 GB', '512MiB' -> bytes (GB: 10^9, GiB: 2^30)."""
    units = {"kib": 1024, "mib": 1024**2, "gib": GIB, "tib": 1024**4, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
    value = text.strip().lower().replace(" ", "")
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            try:
                number = float(value[: -len(suffix)])
            except ValueError:
                break
            if number > 0:
                return int(number * factor)
            break
    raise SpecError(f"--device-memory {text!r}: give a size such as 24GiB, 80GB or 141GB")


@dataclass(frozen=True)
class PlanSpec:
    arch: Architecture
    resolution: int
    steps: int
    batch: int = 1
    dtype: str = "bf16"
    target: str = "lora"
    rank: int = 32
    guidance: bool = True  # classifier-free guidance where the model uses it
    checkpoint_blocks: bool = False
    vae_in_backward: bool = True
    device_memory: int | None = None
    tflops: float = 400.0

    @property
    def guided_arch(self) -> Architecture:
        """The architecture as it runs: without classifier-free guidance when it is turned off."""
        return self.arch if self.guidance or self.arch.guidance != "cfg" else replace(self.arch, guidance="none")

    def check(self) -> None:
        if self.target not in TARGETS:
            raise SpecError(f"--target {self.target!r}: give one of {', '.join(TARGETS)}")
        if self.dtype not in DTYPES:
            raise SpecError(f"--dtype {self.dtype!r}: give one of {', '.join(DTYPES)}")
        for name, value in (("--steps", self.steps), ("--batch", self.batch), ("--rank", self.rank)):
            if value < 1:
                raise SpecError(f"{name} {value}: give a positive integer")
        if not self.tflops > 0:
            raise SpecError(f"--tflops {self.tflops}: give a positive throughput")
        self.arch.check_resolution(self.resolution)


@dataclass(frozen=True)
class PlanRow:
    estimator: str
    memory_class: str
    forwards: float
    vjps: float
    weights: int
    optimiser: int
    gradients: int
    activations: int | None
    vae: int
    total: int | None
    flops: float
    seconds: float


def plan_units(spec: PlanSpec) -> Units:
    spec.check()
    return units(spec.guided_arch, spec.resolution, spec.batch, spec.dtype, TARGETS[spec.target], spec.rank)


def plan_rows(
    spec: PlanSpec, unit: Units, estimators: list[str] | None = None, measured: MeasuredUnits | None = None
) -> list[PlanRow]:
    """One row per estimator; times from FLOPs at spec.tflops, or from `measured` F and V seconds."""
    from bench.registry import ESTIMATORS

    param_element = unit.param_bytes / unit.params
    a = unit.activations_checkpointed if spec.checkpoint_blocks else unit.activations
    rows = []
    for name in estimators or ESTIMATORS.names():
        estimator = ESTIMATORS.create(name)
        try:
            estimator.check_steps(spec.steps)
            cost = estimator.cost(spec.steps, COST_TARGET[spec.target])
        except SpecError:
            continue  # options that cannot run N steps (a plan lists what can)
        trainable = unit.trainable if TARGETS[spec.target] != "input" else 0
        lora_bytes = int(trainable * param_element) if TARGETS[spec.target] == "lora" else 0
        weights = unit.param_bytes + unit.vae_param_bytes + lora_bytes
        optimiser = trainable * ADAM_BYTES
        gradients = int(trainable * param_element) if trainable else unit.state
        through_vae = spec.vae_in_backward and estimator.reward_gradient and cost.nfe_vjp > 0
        vae = unit.vae_activations if through_vae else 0
        activations = cost.predicted_bytes(a, unit.state)
        activations = None if activations is None else int(activations)
        # the reward's graph and the calls' graphs are alive together only where the estimator
        # keeps the calls' graphs from the forward (Cost.activations_at_reward)
        peak_activations = cost.predicted_peak_bytes(a, unit.state, vae, unit.working)
        peak_activations = None if peak_activations is None else int(peak_activations)
        # the time model (forwards·F + VJPs·V), in FLOPs
        flops = cost.predicted_seconds(unit.flops_forward, unit.flops_backward)
        if spec.checkpoint_blocks:
            flops += cost.nfe_vjp * unit.flops_forward  # each VJP's call is recomputed block by block
        flops += unit.vae_flops_forward + (unit.vae_flops_backward if through_vae else 0.0)
        seconds = flops / (spec.tflops * 1e12)
        if measured is not None:
            seconds = cost.predicted_seconds(measured.forward, measured.backward)
            if spec.checkpoint_blocks:
                seconds += cost.nfe_vjp * measured.forward
            seconds += measured.vae_forward + (measured.vae_backward if through_vae else 0.0)
        rows.append(
            PlanRow(
                estimator=estimator.spec,
                memory_class=cost.memory,
                forwards=cost.nfe_forward,
                vjps=cost.nfe_vjp,
                weights=weights,
                optimiser=optimiser,
                gradients=gradients,
                activations=activations,
                vae=vae,
                total=None if peak_activations is None else weights + optimiser + gradients + peak_activations,
                flops=flops,
                seconds=seconds,
            )
        )
    return rows


def flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


def count(value: float) -> str:
    return f"{value / 1e9:.2f} B" if value >= 1e9 else f"{value / 1e6:.1f} M" if value >= 1e6 else f"{value:.0f}"


def seconds(value: float) -> str:
    return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"


def render(
    spec: PlanSpec, unit: Units, rows: list[PlanRow], memory_label: str = "", measured: MeasuredUnits | None = None
) -> str:
    """The plan as Markdown: what was counted, then one row per estimator."""
    arch = spec.arch
    cfg = arch.guidance == "cfg" and spec.guidance
    a = unit.activations_checkpointed if spec.checkpoint_blocks else unit.activations
    lines = [
        f"**{arch.name}** at {spec.resolution}², N = {spec.steps}, batch {spec.batch}"
        f"{' (×2 through the denoiser: classifier-free guidance)' if cfg else ''}, {spec.dtype}, target "
        f"{spec.target}{f' (rank {spec.rank} on the attention projections)' if spec.target == 'lora' else ''}"
        f"{', denoiser blocks checkpointed' if spec.checkpoint_blocks else ''}"
        f"{', VAE decode in the backward' if spec.vae_in_backward else ''}.",
        "",
        f"Counted under fake tensors: denoiser {count(unit.params)} parameters ({size(unit.param_bytes)}), "
        f"{count(unit.trainable)} trainable; A = {size(a)} per call, S = {size(unit.state)}, "
        f"F = {flops(unit.flops_forward)}, V = {flops(unit.flops_backward)}; VAE decode: {size(unit.vae_activations)} "
        f"kept, {flops(unit.vae_flops_forward)}; attention {unit.attention_kernel}. "
        + (
            f"Times at {spec.tflops:g} TFLOP/s sustained."
            if measured is None
            else f"Times from F = {measured.forward * 1e3:.4g} ms, V = {measured.backward * 1e3:.4g} ms and the VAE "
            f"decode's {measured.vae_forward * 1e3:.4g} + {measured.vae_backward * 1e3:.4g} ms, measured on "
            f"{measured.device} (random weights, median of {measured.rounds} rounds)."
        ),
        "",
    ]
    label = memory_label or (size(spec.device_memory) if spec.device_memory else "")
    fits = f" | fits {label}" if spec.device_memory else ""
    lines += [
        "| estimator | memory class | fwd / VJP | weights | Adam | grads | activations | VAE | peak"
        f"{fits} | FLOPs / grad | s / grad |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if fits else "") + "---|---|",
    ]
    for row in rows:
        fit = ""
        if spec.device_memory:
            fit = " | -" if row.total is None else (" | yes" if row.total <= spec.device_memory else " | **no**")
        lines.append(
            f"| {row.estimator} | {row.memory_class} | {row.forwards:g} / {row.vjps:g} | {size(row.weights)} | "
            f"{size(row.optimiser)} | {size(row.gradients)} | {size(row.activations)} | {size(row.vae)} | "
            f"**{size(row.total)}**{fit} | {flops(row.flops)} | {seconds(row.seconds)} |"
        )
    return "\n".join(lines)
