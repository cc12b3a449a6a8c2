"""What a gate pattern saves on a real architecture (DiP-GO's search space, bench/gating.py),
without weights or a GPU: the denoiser is built under fake tensors, one call at the plan's
resolution and batch is counted by torch's FlopCounterMode per gated block (a U-Net's down, mid
and up blocks; a transformer's blocks), and the operations fraction of an N-step pass follows for
the static baselines and for a pattern from a file. The speed-up it states is the operations
bound 1 / fraction: what the pattern gives where the denoiser's time follows its operations."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import gating
from bench.errors import SpecError
from bench.planner.units import DTYPES, _build_denoiser, default_dtype, denoiser_inputs


def block_flops(arch, resolution: int, batch: int, dtype: str, guidance: bool = True) -> dict[str, float]:
    """FLOPs of each gated block of one denoiser call and of the rest, counted under fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch_dtype = DTYPES[dtype]
    calls = batch * (2 if arch.guidance == "cfg" and guidance else 1)
    with FakeTensorMode(), default_dtype(torch_dtype), torch.no_grad():
        model = _build_denoiser(arch)
        inputs = denoiser_inputs(arch, calls, resolution, torch_dtype)
        return gating.block_flops(model, lambda: model(**inputs))


def read_pattern(path: Path, steps: int, blocks: int) -> torch.Tensor:
    """A 0/1 gate pattern from a JSON file: a list of N - 1 rows (steps N-1..1) of one 0 or 1 per
    block, or an object with such a list under "pattern"."""
    owner = f"--gate-pattern {path}"
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"{owner}: not a readable JSON file ({str(exc).splitlines()[0]})") from None
    rows = value.get("pattern") if isinstance(value, dict) else value
    valid = (
        isinstance(rows, list)
        and len(rows) == steps - 1
        and all(isinstance(r, list) and len(r) == blocks and all(v in (0, 1) for v in r) for r in rows)
    )
    if not valid:
        raise SpecError(
            f"{owner}: expected N - 1 = {steps - 1} rows (steps N-1..1) of {blocks} gates (0: reuse, 1: compute), "
            "as a JSON list of lists"
        )
    return torch.tensor(rows, dtype=torch.bool)


def render(arch, resolution: int, steps: int, batch: int, dtype: str, pattern_file: Path | None = None) -> str:
    """The gated blocks' share of one call and each pattern's operations fraction, as Markdown."""
    if steps < 2:
        raise SpecError(f"--steps {steps}: gates need N >= 2 (step N computes every block)")
    flops = block_flops(arch, resolution, batch, dtype)
    names = [name for name in flops if name != "rest"]
    total = sum(flops.values())
    lines = [
        f"**Gates on {arch.name}** at {resolution}², batch {batch}, {dtype}: {len(names)} gated blocks, "
        f"{total / 1e12:.4g} TFLOPs per denoiser call ({flops['rest'] / total:.2%} outside the blocks, always run).",
        "",
        "| block | share of a call |",
        "|---|---|",
        *(f"| {name} | {flops[name] / total:.1%} |" for name in names),
        "",
        f"N = {steps}: operations of the pass against the unpruned pass (step N computes every block); the "
        "speed-up is the operations bound.",
        "",
        "| pattern | operations | speed-up bound |",
        "|---|---|---|",
    ]
    patterns = gating.static_patterns(steps, len(names))
    if pattern_file is not None:
        patterns = {f"file {Path(pattern_file).name}": read_pattern(pattern_file, steps, len(names)), **patterns}
    for name, pattern in patterns.items():
        fraction = gating.flops_fraction(pattern, flops)
        lines.append(f"| {name} | {fraction:.3f} | {1 / fraction:.2f}× |")
    return "\n".join(lines)
