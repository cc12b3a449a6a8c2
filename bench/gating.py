"""DiP-GO's search space on any diffusers denoiser (arXiv 2410.16942): a keep/reuse gate per
(step, block). A block whose gate is open at step i is computed; a closed one hands on what it
computed at step i + 1 (the previous step in sampling order), as cached features are reused by
DeepCache, DiP-GO and the caching methods of diffusion transformers. The first step (i = N)
computes every block: there is nothing to reuse yet.

The blocks are read from the network's own module structure (`blocks_of`):

- a `UNet2DConditionModel` (SD 1.x, 2.x, SDXL, digits): every down block, the mid block and every
  up block. A closed block hands on its previous output (a down block its skip features too), as
  DeepCache reuses the deep branch's features;
- a transformer (`SD3Transformer2DModel`, `FluxTransformer2DModel`): every entry of
  `transformer_blocks` and `single_transformer_blocks`. A closed block adds its previous residual
  (output minus input, per stream) to its new input, as the layer caching of DiTs does: the
  residual stream keeps what the blocks before it changed.

Everything outside the blocks (input and time embeddings, the output head) always runs, and the
network's own forward does the wiring: gated blocks are swapped in for the length of one call, so
with every gate open a call is the model's forward itself, bit for bit.

Gates come from logits z (the `gates` target, one row per step N-1..1) through the straight-through
estimator: the forward uses the hard gate g = [z > 0] exactly; the backward uses dg/dz = sigma'(z).
While a gradient to the gates is being recorded every block is computed (d out/d g = new - reused
needs the new output); without one, a closed block is skipped, which is where the speed-up comes
from. The same code serves the search and the deployed sampler.

The cache makes the network stateful: the calls of one pass must come in the sampler's order
N, N-1, ..., 1 on its grid (a pass starts at step N). A call off the grid or out of order raises."""

from __future__ import annotations

import copy
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from bench.capabilities import FEW_STEP_CHAIN, IN_ORDER
from bench.options import Option, at_least
from bench.problem import Problem, Target, register_target

GATES = register_target(
    Target(
        "gates",
        "keep/reuse gate logits per (step, block) of a gated denoiser (DiP-GO's pruning search)",
        needs="a task with gated denoiser blocks (DiP-GO)",
        unreached_calls=1,
    )
)  # step N computes every block: its output depends on no gate

UNET_LISTS = ("down_blocks", "up_blocks")
TRANSFORMER_LISTS = ("transformer_blocks", "single_transformer_blocks")
STREAMS = ("encoder_hidden_states", "hidden_states")  # a transformer block's outputs, in diffusers' order


@dataclass(frozen=True)
class Block:
    name: str  # its path in the network: down_blocks.0, mid_block, transformer_blocks.3
    module: nn.Module
    residual: bool  # reuse adds the previous residual (transformers); else hands on the previous output

    @property
    def label(self) -> str:
        """A short name for tables and fields: down0, mid, up1, block3, single2."""
        kind, _, index = self.name.partition(".")
        short = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}.get(kind)
        short = short or {"transformer_blocks": "block", "single_transformer_blocks": "single"}[kind]
        return short + index


def blocks_of(network: nn.Module) -> list[Block]:
    """The gated blocks of a diffusers U-Net or transformer, in call order."""
    found: list[Block] = []
    if all(hasattr(network, name) for name in UNET_LISTS):
        found += [Block(f"down_blocks.{i}", b, False) for i, b in enumerate(network.down_blocks)]
        if getattr(network, "mid_block", None) is not None:
            found.append(Block("mid_block", network.mid_block, False))
        found += [Block(f"up_blocks.{i}", b, False) for i, b in enumerate(network.up_blocks)]
    for name in TRANSFORMER_LISTS:
        found += [Block(f"{name}.{i}", b, True) for i, b in enumerate(getattr(network, name, None) or ())]
    if not found:
        raise ValueError(
            f"{type(network).__name__} has no down/mid/up blocks and no transformer blocks to gate; "
            "gates serve diffusers' UNet2DConditionModel and its transformers (SD3, FLUX)"
        )
    return found


@dataclass
class BlockCounter:
    """Blocks computed and blocks reused from the previous step, over every call."""

    computed: int = 0
    reused: int = 0


def straight_through(logits: Tensor) -> Tensor:
    """The hard gate [z > 0] in the forward, sigma'(z) in the backward (exactly 0 or 1 in value)."""
    hard = (logits > 0).to(logits.dtype)
    if not (logits.requires_grad and torch.is_grad_enabled()):
        return hard
    soft = torch.sigmoid(logits)
    return hard + soft - soft.detach()


def _map(fn, *trees):
    """fn over matching tensors of nested tuples and lists (None where any of them is None: the
    stream a block does not return, as SD3's last block its text tokens)."""
    first = trees[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_map(fn, *parts) for parts in zip(*trees))
    return None if any(tree is None for tree in trees) else fn(*trees)


class _Pass:
    """One call's gate row, what it reuses and what it leaves for the next step."""

    def __init__(self, gates: Tensor | None, previous: list | None) -> None:
        self.gates, self.previous = gates, previous
        self.recording = gates is not None and gates.requires_grad and torch.is_grad_enabled()
        self.is_open = None if gates is None or self.recording else (gates > 0.5).tolist()
        self.kept: list = []


class GatedNetwork(nn.Module):
    """A diffusers U-Net or transformer with a gate per (step, block) (see the module): called as
    the network is, its attributes (config, dtype) are the network's.

    `model_times` are the timesteps the network receives at steps N..1; `gates` is a
    (N - 1, number of blocks) tensor of logits for steps N-1..1 (row r is step N - 1 - r), or a
    fixed 0/1 pattern."""

    def __init__(self, network: nn.Module, model_times: list[float], gates: Tensor) -> None:
        super().__init__()
        self.network = network
        self.blocks = blocks_of(network)
        if gates.shape != (len(model_times) - 1, len(self.blocks)):
            raise ValueError(
                f"gates of shape {tuple(gates.shape)}; expected {(len(model_times) - 1, len(self.blocks))}"
            )
        self.gates = gates
        self.steps = len(model_times)
        self._step_at = {round(float(t), 6): self.steps - r for r, t in enumerate(model_times)}
        self._cache: dict[int, list] = {}
        self._signature = inspect.signature(network.forward)
        self._block_signatures = [inspect.signature(b.module.forward) for b in self.blocks]
        self.counter = BlockCounter()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            network = self.__dict__.get("_modules", {}).get("network")
            if network is None:
                raise
            return getattr(network, name)

    @property
    def labels(self) -> list[str]:
        return [b.label for b in self.blocks]

    def step_of(self, timestep) -> int:
        """The sampler's step of this call's timestep (one read from the device, not one per row)."""
        values = torch.as_tensor(timestep).reshape(-1)
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

    def forward(self, *args, **kwargs):
        step = self.step_of(self._signature.bind(*args, **kwargs).arguments["timestep"])
        if step == self.steps:
            self._cache = {}
        elif step + 1 not in self._cache:
            raise RuntimeError(
                f"gated denoiser called at step {step} without step {step + 1} before it in this "
                "pass: a pass runs the sampler's steps N..1 in order"
            )
        state = _Pass(self.gate_row(step), self._cache.get(step + 1))
        saved = []
        for index, block in enumerate(self.blocks):  # swapped in for this call only
            saved.append(block.module.__dict__.get("forward"))
            original = block.module.forward
            block.module.forward = functools.partial(self._block_call, state, index, original)
        try:
            out = self.network(*args, **kwargs)
        finally:
            for block, before in zip(self.blocks, saved):
                del block.module.forward
                if before is not None:
                    block.module.forward = before
        self._cache[step] = state.kept
        return out

    def _streams(self, index: int, args, kwargs):
        """A transformer block's inputs in the order of its outputs (STREAMS), or its one input."""
        arguments = self._block_signatures[index].bind(*args, **kwargs).arguments
        return tuple(arguments.get(name) for name in STREAMS)

    def _block_call(self, state: _Pass, index: int, original: Callable, *args, **kwargs):
        block, previous = self.blocks[index], state.previous
        inputs = self._streams(index, args, kwargs) if block.residual else None

        def reused():
            if not block.residual:
                return previous[index]
            return _residual_sum(inputs, previous[index])

        if state.is_open is not None and not state.is_open[index]:
            out = reused()
            self.counter.reused += 1
        else:
            out = original(*args, **kwargs)
            self.counter.computed += 1
            if state.recording:  # out = g new + (1 - g) reused, g exactly 0 or 1 in value
                g = state.gates[index]
                out = _map(lambda new, old: g * new + (1 - g) * old, out, reused())
        state.kept.append(_residual_of(out, inputs) if block.residual else out)
        return out


def _residual_of(out, inputs):
    """Output minus input, per stream (a block with one output: its hidden states)."""
    if isinstance(out, Tensor):
        return out - inputs[1]
    return _map(lambda o, i: o - i, tuple(out), inputs)


def _residual_sum(inputs, residual):
    if isinstance(residual, Tensor):
        return inputs[1] + residual
    return _map(lambda i, r: i + r, inputs, residual)


def install(holder: nn.Module, path: tuple[str, ...], model_times: list[float], gates: Tensor) -> GatedNetwork:
    """Gate the network at `holder.<path>` in place (the problem's own copy), and return it."""
    parent = functools.reduce(getattr, path[:-1], holder)
    gated = GatedNetwork(getattr(parent, path[-1]), model_times, gates)
    setattr(parent, path[-1], gated)
    return gated


def with_network(holder: nn.Module, path: tuple[str, ...], network: nn.Module) -> nn.Module:
    """A shallow copy of `holder` whose network at `path` is `network` (the rest shared)."""
    top = copy.copy(holder)
    top._modules = dict(holder._modules)
    if len(path) == 1:
        top._modules[path[0]] = network
    else:
        top._modules[path[0]] = with_network(holder._modules[path[0]], path[1:], network)
    return top


def model_times(schedule, scale: float = 1.0) -> list[float]:
    return [schedule.model_time(i) * scale for i in range(schedule.num_steps, 0, -1)]


# --- gate patterns ---------------------------------------------------------------------------------

STATIC_KINDS = ("deepcache", "reuse")
INTERVALS = (2, 3, 4, 5)


def pattern(steps: int, blocks: int, kind: str, interval: int) -> Tensor:
    """A static (N - 1, blocks) bool pattern for steps N-1..1: every block is computed at steps
    i with (N - i) % interval == 0; in between, `deepcache` computes the outermost blocks (the
    first and the last: a U-Net's shallow branch, a transformer's first and last layer) and reuses
    the rest, `reuse` reuses every block."""
    rows = []
    for step in range(steps - 1, 0, -1):
        full = (steps - step) % interval == 0
        rows.append([full or (kind == "deepcache" and b in (0, blocks - 1)) for b in range(blocks)])
    return torch.tensor(rows, dtype=torch.bool).reshape(steps - 1, blocks)


def static_patterns(steps: int, blocks: int) -> dict[str, Tensor]:
    """The static baselines: DeepCache-like (the inner blocks reused between full steps) and
    uniform reuse of every block, every k-th step computed."""
    return {f"{kind}{k}": pattern(steps, blocks, kind, k) for kind in STATIC_KINDS for k in INTERVALS if k < steps}


def hard_pattern(logits: Tensor) -> Tensor:
    return logits.detach() > 0


# --- operations ------------------------------------------------------------------------------------


def block_flops(network: nn.Module, call: Callable[[], object]) -> dict[str, float]:
    """Floating-point operations of each gated block (by label) and of the rest ("rest") of one
    call, counted by torch's FlopCounterMode (attention too: bench/measure/flops.py): `call()` calls
    `network` once (real or fake tensors)."""
    blocks = blocks_of(network)
    from bench.measure.flops import flop_counter

    with flop_counter() as counter:
        call()
    by_module = counter.get_flop_counts()
    total = float(sum(by_module["Global"].values()))
    counts: dict[str, float] = {}
    for block in blocks:
        keys = [k for k in by_module if k.endswith("." + block.name)]
        counts[block.label] = float(sum(by_module[min(keys, key=len)].values())) if keys else 0.0
    counts["rest"] = total - sum(counts.values())
    return counts


def operations_fraction(gate_values: Tensor, flops: dict[str, float]) -> Tensor:
    """Operations of an N-step pass with these gate values (N - 1, blocks) over the unpruned
    pass's. Given straight-through gates it is the hard fraction in value with its gradient through
    sigma'(z) (DiP-GO's sparsity term acts on the expected operations)."""
    steps = gate_values.shape[0] + 1
    per_call = sum(flops.values())
    names = [name for name in flops if name != "rest"]
    block = torch.tensor([flops[name] for name in names], dtype=gate_values.dtype, device=gate_values.device)
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


# --- the search problem ----------------------------------------------------------------------------


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def gate_options() -> tuple[Option, ...]:
    """The options of a task with the gates target."""
    return (
        Option(
            "gate_keep",
            float,
            0.5,
            "gates target: the fraction of the unpruned sampler's operations the sparsity term allows for free",
            check=_fraction,
        ),
        Option("gate_sparsity", float, 1.0, "gates target: the sparsity term's weight", check=at_least(0.0)),
        Option("gate_init", float, 1.0, "gates target: the mean initial gate logit (> 0: computed)"),
        Option(
            "gate_spread",
            float,
            1.0,
            "gates target: the standard deviation of the initial logits "
            "around gate_init (seeded; 0: all equal, where the consistency term has no gradient)",
            check=at_least(0.0),
        ),
    )


def problem_flops(problem: Problem, path: tuple[str, ...]) -> dict[str, float]:
    """block_flops of one call of the problem's own denoiser (guidance included) at step N."""
    network = functools.reduce(getattr, path, problem.chain.denoiser)
    t = torch.full((problem.x_start.shape[0],), problem.chain.schedule.model_time(problem.num_steps))
    with torch.no_grad():
        return block_flops(
            network, lambda: problem.chain.denoiser(problem.x_start, t.to(problem.x_start), problem.cond)
        )


def search(task, problem: Problem, path: tuple[str, ...], seed: int, flops=None, time_scale: float = 1.0) -> Problem:
    """gate_problem with the task's gate options (gate_init, gate_spread, gate_keep, gate_sparsity)
    on a latent problem; `time_scale`: what the network receives per model time (FLUX: 1/1000)."""
    flops = flops or problem_flops(problem, path)
    logits = initial_logits(problem.num_steps, len(flops) - 1, seed, task.gate_init, task.gate_spread)
    logits = logits.to(problem.x_start).requires_grad_(True)
    settings = GateSettings(task.gate_keep, task.gate_sparsity)
    return gate_problem(problem, path, logits, flops, settings, time_scale)


def gate_problem(
    problem: Problem,
    path: tuple[str, ...],
    logits: Tensor,
    flops: dict[str, float],
    settings: GateSettings,
    time_scale: float = 1.0,
) -> Problem:
    """DiP-GO's search on a latent problem of the frozen model: gate logits per (step, block) of
    the network at `problem.chain.denoiser.<path>`; reward: consistency, -(mean squared distance of
    x_0 to the unpruned sampler's x_0 from the same noise); penalty: sparsity on the gates'
    operations fraction above settings.keep."""
    problem.x_start.requires_grad_(False)
    with torch.no_grad():
        unpruned = problem.chain.sample(problem.x_start, problem.cond, problem.noises)
    install(problem.chain.denoiser, path, model_times(problem.chain.schedule, time_scale), logits)
    problem.chain.counter.reset()
    problem.target, problem.leaves = GATES, [logits]
    dims = tuple(range(1, unpruned.dim()))
    problem.reward_fn = lambda x: -((x - unpruned) ** 2).mean(dim=dims)
    problem.penalty = lambda: settings.penalty(logits, flops)
    problem.requires[IN_ORDER] = "the gates target's denoiser reuses block outputs of the previous step"
    problem.extras.pop(FEW_STEP_CHAIN, None)
    problem.extras[GATES] = flops  # the operations per block, for the evaluation of the found gates
    return problem


def initial_logits(steps: int, blocks: int, seed: int, mean: float, spread: float) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return mean + spread * torch.randn(steps - 1, blocks, generator=generator)


# --- the deployed sampler: speed and quality ----------------------------------------------------


@dataclass
class SamplerOutcome:
    samples: Tensor
    computed: int
    reused: int

    @property
    def block_fraction(self) -> float:
        total = self.computed + self.reused
        return self.computed / total if total else math.nan


@torch.no_grad()
def deployed_samples(
    chain,
    path: tuple[str, ...],
    network: nn.Module,
    gate_pattern: Tensor,
    x_start: Tensor,
    cond,
    noises,
    time_scale: float = 1.0,
) -> SamplerOutcome:
    """x_0 of the pruned sampler (closed blocks skipped), with its block counts: `chain`'s
    denoiser with `network` gated by the pattern at `path`."""
    from bench.chain import Chain

    gated = GatedNetwork(network, model_times(chain.schedule, time_scale), gate_pattern)
    pruned = Chain(with_network(chain.denoiser, path, gated), chain.schedule)
    samples = pruned.sample(x_start, cond, noises)
    return SamplerOutcome(samples, gated.counter.computed, gated.counter.reused)


def ungated(problem: Problem, path: tuple[str, ...]) -> nn.Module:
    """The frozen network under a gates problem's GatedNetwork."""
    return functools.reduce(getattr, path, problem.chain.denoiser).network


def evaluate_patterns(
    patterns: dict[str, Tensor],
    *,
    chain,
    path: tuple[str, ...],
    network: nn.Module,
    fresh: Tensor,
    cond,
    noises,
    quality,
    flops: dict[str, float],
    device: torch.device,
    threads: int,
    rounds: int = 3,
    timing_samples: int = 64,
    time_scale: float = 1.0,
) -> dict[str, float]:
    """For each named pattern: quality of its samples from `fresh` (quality(samples, unpruned) ->
    metrics), its operations and block fractions, and its wall-clock per pass on the first
    `timing_samples` samples, timed round-robin with the unpruned sampler (bench.measure.timing), as
    `<name>_<metric>`; `<name>_speedup` is the unpruned time over its time."""
    from bench.measure.timing import time_interleaved

    steps, blocks = chain.schedule.num_steps, len(blocks_of(network))
    everything = torch.ones(steps - 1, blocks, dtype=torch.bool)

    def run(gate_pattern, x, noise):
        return deployed_samples(chain, path, network, gate_pattern, x, cond, noise, time_scale)

    reference = run(everything, fresh, noises).samples
    timed = fresh[:timing_samples]
    timed_noises = None if noises is None else [n[:timing_samples] for n in noises]
    calls = {"unpruned": lambda: run(everything, timed, timed_noises)}
    fields = {f"unpruned_{k}": v for k, v in quality(reference, reference).items() if k != "consistency_mse"}
    for name, gate_pattern in patterns.items():
        outcome = run(gate_pattern, fresh, noises)
        fields.update({f"{name}_{k}": v for k, v in quality(outcome.samples, reference).items()})
        fields[f"{name}_block_fraction"] = outcome.block_fraction
        fields[f"{name}_flops_fraction"] = flops_fraction(gate_pattern, flops)
        calls[name] = lambda p=gate_pattern: run(p, timed, timed_noises)
    results = time_interleaved(calls, device, rounds=rounds, threads=threads, warmup=1)
    unpruned = results["unpruned"].summary()["time_s"]
    fields["unpruned_time_s"] = unpruned
    for name in patterns:
        seconds = results[name].summary()["time_s"]
        fields[f"{name}_time_s"] = seconds
        fields[f"{name}_speedup"] = unpruned / seconds
    return fields


def evaluate_search(problem: Problem, baselines: dict, key: tuple, **measure) -> dict[str, float]:
    """The searched gates of a gates problem deployed (evaluate_patterns, as `pruned_<metric>`)
    with the static baselines beside them, measured once per `key` in `baselines` (they do not
    depend on the gate options). `measure`: evaluate_patterns' keywords but `flops`, which are
    the search's own (gate_problem keeps them in the problem's extras)."""
    logits = problem.leaves[0]
    measure["flops"] = problem.extras[GATES]
    found = evaluate_patterns({"pruned": hard_pattern(logits)}, **measure)
    if key not in baselines:
        baselines[key] = evaluate_patterns(static_patterns(problem.num_steps, logits.shape[1]), **measure)
    return {**found, **{k: v for k, v in baselines[key].items() if not k.startswith("unpruned_")}}
