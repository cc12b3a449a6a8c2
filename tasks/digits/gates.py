"""DiP-GO's search space on the digits U-Net (arXiv 2410.16942): a keep/reuse gate per (step,
block). A block whose gate is open at step i is computed; a closed one hands on its output from
step i + 1 (the previous step in sampling order), as cached features are reused by DeepCache and
DiP-GO. The first step (i = N) computes every block: there is nothing to reuse yet.

Blocks are the U-Net's own: down_blocks[0], down_blocks[1], mid_block, up_blocks[0], up_blocks[1]
(BLOCKS). conv_in, the time embedding and the output head always run. A closed down block hands on
both its output and its skip features.

Gates come from logits z (the `gates` target, one row per step N-1..1) through the straight-through
estimator: the forward uses the hard gate g = [z > 0] exactly; the backward uses dg/dz = sigma'(z).
While a gradient to the gates is being recorded every block is computed (d out/d g = new - cached
needs the new output); without one, a closed block is skipped, which is where the speed-up comes
from. The same code serves the search and the deployed sampler.

The cache makes the denoiser stateful: the calls of one pass must come in the sampler's order
N, N-1, ..., 1 on its grid (a pass starts at step N). A call off the grid or out of order raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bench.problem import Target, register_target

GATES = register_target(
    Target(
        "gates",
        "keep/reuse gate logits per (step, block) of a gated denoiser (DiP-GO's pruning search)",
        needs="a task with gated denoiser blocks (DiP-GO)",
        unreached_calls=1,
    )
)  # step N computes every block: its output depends on no gate
BLOCKS = ("down0", "down1", "mid", "up0", "up1")
DEEP = ("down1", "mid", "up0")  # DeepCache's reused branch; down0 -> up1 is its shallow branch


@dataclass
class BlockCounter:
    """Blocks computed and blocks handed on from the previous step, over every call."""

    computed: int = 0
    reused: int = 0


def straight_through(logits: Tensor) -> Tensor:
    """The hard gate [z > 0] in the forward, sigma'(z) in the backward (exactly 0 or 1 in value)."""
    hard = (logits > 0).to(logits.dtype)
    if not (logits.requires_grad and torch.is_grad_enabled()):
        return hard
    soft = torch.sigmoid(logits)
    return hard + soft - soft.detach()


class GatedUNet(nn.Module):
    """The digits UNet2DConditionModel's forward with a gate per (step, block) (see the module).

    `model_times` are the sampler's model times at steps N..1; `gates` is a (N - 1, len(BLOCKS))
    tensor of logits for steps N-1..1 (row r is step N - 1 - r), or a fixed 0/1 pattern."""

    def __init__(self, unet: nn.Module, model_times: list[float], gates: Tensor) -> None:
        super().__init__()
        check_unet(unet)
        if gates.shape != (len(model_times) - 1, len(BLOCKS)):
            raise ValueError(f"gates of shape {tuple(gates.shape)}; expected {(len(model_times) - 1, len(BLOCKS))}")
        self.unet = unet
        self.gates = gates
        self.steps = len(model_times)
        self._step_at = {round(float(t), 6): self.steps - r for r, t in enumerate(model_times)}
        self._cache: dict[int, list[tuple[Tensor, ...]]] = {}
        self.counter = BlockCounter()

    def step_of(self, timestep: Tensor) -> int:
        """The sampler's step of this call's model time (one read from the device, not one per row)."""
        values = timestep.reshape(-1)
        step = self._step_at.get(round(float(values[0]), 6))
        if step is None or not bool((values == values[0]).all()):
            raise RuntimeError(
                f"gated denoiser called at model time {float(values[0])}, off its sampler's grid: "
                "the gates target needs estimators that run the sampler's own steps in order"
            )
        return step

    def gate_row(self, step: int) -> Tensor | None:
        """The gates of `step` (None at step N: every block computed)."""
        if step == self.steps:
            return None
        row = self.gates[self.steps - 1 - step]
        return straight_through(row) if row.is_floating_point() else row.to(torch.float32)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> UNet2DConditionOutput:
        step = self.step_of(timestep)
        if step == self.steps:
            self._cache = {}
        elif step + 1 not in self._cache:
            raise RuntimeError(
                f"gated denoiser called at step {step} without step {step + 1} before it in this "
                "pass: a pass runs the sampler's steps N..1 in order"
            )
        gates = self.gate_row(step)
        previous = self._cache.get(step + 1)
        recording = gates is not None and gates.requires_grad and torch.is_grad_enabled()
        is_open = None if gates is None or recording else (gates > 0.5).tolist()
        outputs: list[tuple[Tensor, ...]] = []
        unet = self.unet

        def gated(index: int, compute) -> tuple[Tensor, ...]:
            if is_open is not None and not is_open[index]:
                new = previous[index]
                self.counter.reused += 1
            else:
                new = compute()
                self.counter.computed += 1
                if recording:  # out = g new + (1 - g) cached, g exactly 0 or 1 in value
                    g = gates[index]
                    new = tuple(g * a + (1 - g) * b for a, b in zip(new, previous[index]))
            outputs.append(new)
            return new

        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        hidden = unet.conv_in(sample)
        skips: tuple[Tensor, ...] = (hidden,)
        for index, block in enumerate(unet.down_blocks):

            def down(block=block, hidden=hidden) -> tuple[Tensor, ...]:
                if getattr(block, "has_cross_attention", False):
                    out, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
                else:
                    out, res = block(hidden_states=hidden, temb=emb)
                return (out, *res)

            hidden, *res = gated(index, down)
            skips += tuple(res)
        (hidden,) = gated(
            len(unet.down_blocks),
            lambda hidden=hidden: (unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states),),
        )
        for offset, block in enumerate(unet.up_blocks):
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]

            def up(block=block, hidden=hidden, res=res) -> tuple[Tensor]:
                if getattr(block, "has_cross_attention", False):
                    return (
                        block(
                            hidden_states=hidden,
                            temb=emb,
                            res_hidden_states_tuple=res,
                            encoder_hidden_states=encoder_hidden_states,
                        ),
                    )
                return (block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res),)

            (hidden,) = gated(len(unet.down_blocks) + 1 + offset, up)
        self._cache[step] = outputs
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return UNet2DConditionOutput(sample=unet.conv_out(hidden))


def check_unet(unet: nn.Module) -> None:
    """GatedUNet reproduces the forward of plain UNet2DConditionModels (digits'): no class or
    added embeddings, a mid block, two down and two up blocks (BLOCKS), no centring."""
    config = unet.config
    plain = (
        config.class_embed_type is None
        and config.addition_embed_type is None
        and unet.mid_block is not None
        and not config.center_input_sample
        and len(unet.down_blocks) == 2
        and len(unet.up_blocks) == 2
        and config.time_embedding_act_fn is None
        and unet.conv_norm_out is not None
    )
    if not plain:
        raise ValueError("GatedUNet serves the plain two-level UNet2DConditionModel of tasks/digits")


# --- gate patterns ---------------------------------------------------------------------------------


def pattern(steps: int, kind: str, interval: int) -> Tensor:
    """A static (N - 1, len(BLOCKS)) bool pattern for steps N-1..1: every block is computed at steps
    i with (N - i) % interval == 0; in between, `deepcache` reuses the deep branch (DEEP) and
    computes the shallow one, `reuse` reuses every block (the whole output)."""
    rows = []
    for step in range(steps - 1, 0, -1):
        full = (steps - step) % interval == 0
        rows.append([full or (kind == "deepcache" and name not in DEEP) for name in BLOCKS])
    return torch.tensor(rows, dtype=torch.bool).reshape(steps - 1, len(BLOCKS))


def hard_pattern(logits: Tensor) -> Tensor:
    return logits.detach() > 0


@torch.no_grad()
def block_flops(unet: nn.Module, cond: Tensor) -> dict[str, float]:
    """Floating-point operations of each block and of the rest of one guided call (batch 2: the
    null and conditional halves), counted by torch's FlopCounterMode on an all-open call."""
    x = torch.zeros(
        2,
        unet.config.in_channels,
        unet.config.sample_size,
        unet.config.sample_size,
        dtype=cond.dtype,
        device=cond.device,
    )
    ehs = cond.expand(2, *cond.shape[-2:])
    gated = GatedUNet(unet, [500.0], torch.zeros(0, len(BLOCKS)))
    counts: dict[str, float] = {}
    modules = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    with FlopCounterMode(display=False) as counter:
        gated(x, torch.full((2,), 500.0, dtype=x.dtype), ehs)
    by_module = counter.get_flop_counts()
    total = float(sum(by_module["Global"].values()))
    for name, module in zip(BLOCKS, modules):
        key = next(k for k in by_module if k.endswith(_module_path(unet, module)))
        counts[name] = float(sum(by_module[key].values()))
    counts["rest"] = total - sum(counts.values())
    return counts


def _module_path(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def operations_fraction(gate_values: Tensor, flops: dict[str, float]) -> Tensor:
    """Operations of an N-step pass with these gate values (N - 1, len(BLOCKS)) over the unpruned
    pass's. Given straight-through gates it is the hard fraction in value with its gradient through
    sigma'(z) (DiP-GO's sparsity term acts on the expected operations)."""
    steps = gate_values.shape[0] + 1
    per_call = sum(flops.values())
    block = torch.tensor([flops[name] for name in BLOCKS], dtype=gate_values.dtype, device=gate_values.device)
    done = steps * flops["rest"] + float(block.sum()) + (gate_values * block).sum()
    return done / (steps * per_call)


def flops_fraction(pattern_: Tensor, flops: dict[str, float]) -> float:
    """operations_fraction of a fixed 0/1 pattern, in float64."""
    return float(operations_fraction(pattern_.to(torch.float64), flops))


@dataclass
class GateSettings:
    keep: float  # the operations fraction the sparsity term allows for free
    sparsity: float  # its weight

    def penalty(self, logits: Tensor, flops: dict[str, float]) -> Tensor:
        """sparsity * max(0, operations fraction - keep)."""
        return self.sparsity * torch.relu(operations_fraction(straight_through(logits), flops) - self.keep)


@dataclass
class SamplerOutcome:
    samples: Tensor
    computed: int
    reused: int

    @property
    def block_fraction(self) -> float:
        total = self.computed + self.reused
        return self.computed / total if total else math.nan


# --- the deployed sampler: speed and quality ----------------------------------------------------

TIMING_SAMPLES = 64  # samples per timed pass (at most fid_samples): 128 U-Net rows with guidance
STATIC = tuple((kind, k) for kind in ("deepcache", "reuse") for k in (2, 3, 4, 5))


def static_patterns(steps: int) -> dict[str, Tensor]:
    """The static baselines: DeepCache-like (the deep branch reused between full steps) and uniform
    reuse of the whole output, every k-th step computed."""
    return {f"{kind}{k}": pattern(steps, kind, k) for kind, k in STATIC if k < steps}


@torch.no_grad()
def deployed_samples(
    unet: nn.Module, denoiser, chain, gate_pattern: Tensor, x_start: Tensor, cond: Tensor, noises
) -> SamplerOutcome:
    """x_0 of the pruned sampler (closed blocks skipped), with its block counts."""
    from bench.chain import Chain

    gated = GatedUNet(unet, model_times(chain.schedule), gate_pattern)
    pruned = Chain(_with_unet(denoiser, gated), chain.schedule)
    samples = pruned.sample(x_start, cond, noises)
    return SamplerOutcome(samples, gated.counter.computed, gated.counter.reused)


def model_times(schedule) -> list[float]:
    return [schedule.model_time(i) for i in range(schedule.num_steps, 0, -1)]


def _with_unet(denoiser, unet: nn.Module):
    """The guided denoiser's guidance around another U-Net (the weights are shared)."""
    from tasks.digits.model import GuidedDenoiser

    return GuidedDenoiser(unet, denoiser.null_embedding, denoiser.guidance)


def evaluate_patterns(
    patterns: dict[str, Tensor],
    *,
    unet: nn.Module,
    denoiser,
    chain,
    fresh: Tensor,
    cond: Tensor,
    noises,
    quality,
    flops: dict[str, float],
    device: torch.device,
    threads: int,
    rounds: int = 3,
) -> dict[str, float]:
    """For each named pattern: quality of its samples from `fresh` (quality(samples, unpruned) ->
    metrics), its operations and block fractions, and its wall-clock per pass on the first
    TIMING_SAMPLES samples, timed round-robin with the unpruned sampler (bench.measure.timing), as
    `<name>_<metric>`; `<name>_speedup` is the unpruned time over its time."""
    from bench.measure.timing import time_interleaved

    steps = chain.schedule.num_steps
    everything = torch.ones(steps - 1, len(BLOCKS), dtype=torch.bool)
    reference = deployed_samples(unet, denoiser, chain, everything, fresh, cond, noises).samples
    timed = fresh[:TIMING_SAMPLES]
    timed_noises = None if noises is None else [n[:TIMING_SAMPLES] for n in noises]
    calls = {"unpruned": lambda: deployed_samples(unet, denoiser, chain, everything, timed, cond, timed_noises)}
    fields = {f"unpruned_{k}": v for k, v in quality(reference, reference).items() if k != "consistency_mse"}
    for name, gate_pattern in patterns.items():
        outcome = deployed_samples(unet, denoiser, chain, gate_pattern, fresh, cond, noises)
        fields.update({f"{name}_{k}": v for k, v in quality(outcome.samples, reference).items()})
        fields[f"{name}_block_fraction"] = outcome.block_fraction
        fields[f"{name}_flops_fraction"] = flops_fraction(gate_pattern, flops)
        calls[name] = lambda p=gate_pattern: deployed_samples(unet, denoiser, chain, p, timed, cond, timed_noises)
    results = time_interleaved(calls, device, rounds=rounds, threads=threads, warmup=1)
    unpruned = results["unpruned"].summary()["time_s"]
    fields["unpruned_time_s"] = unpruned
    for name in patterns:
        seconds = results[name].summary()["time_s"]
        fields[f"{name}_time_s"] = seconds
        fields[f"{name}_speedup"] = unpruned / seconds
    return fields
