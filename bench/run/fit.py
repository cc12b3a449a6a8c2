"""Will a cell fit: before a cell computes a gradient, its predicted footprint (the problem's resident
tensors, the target's gradient and the estimator's peak from its Cost and the units counted on the
problem, bench/planner/live.py) is compared with the memory the device has for it (`--memory-limit`).
A cell that cannot fit becomes a skip row with the prediction as its reason, instead of an
out-of-memory failure (or, on a CPU, the kernel's OOM killer ending the whole sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.errors import SkipCell, SpecError
from bench.planner.live import ProblemUnits, problem_units
from bench.results.summary import format_bytes

MEMORY_LIMITS = "auto (the device's free memory), off, or a size such as 24GiB or 80GB"
SKIP_KIND = "memory-limit"  # a skip row that depends on the machine: a resumed sweep runs it again


def parse_limit(text: str) -> int | None | str:
    """'auto' -> 'auto', 'off' -> None, a size -> bytes (SpecError otherwise)."""
    from bench.planner.table import parse_bytes

    if text in ("auto", "off"):
        return None if text == "off" else "auto"
    try:
        return parse_bytes(text)
    except SpecError:
        raise SpecError(f"--memory-limit {text!r}: give {MEMORY_LIMITS}") from None


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes free for new tensors, where the figure comes from) on this device now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + reusable, "free CUDA memory"
    free = _meminfo("MemAvailable")
    cgroup = _cgroup_free()
    if cgroup is not None and (free is None or cgroup < free):
        return cgroup, "the cgroup's memory.max less its use"
    return free, "MemAvailable"


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_free() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


class FitCheck:
    """The units of each problem (counted once per task, target and seed) and the decision per cell."""

    def __init__(self, limit: int | None | str, device: torch.device) -> None:
        self.limit, self.device = limit, device
        self.units: dict[tuple, ProblemUnits] = {}

    def fields(self, cell, problem, cost) -> dict[str, Any]:
        """The row's planned-memory fields; raises SkipCell (a memory-limit skip) if the cell cannot fit."""
        chain = cell.estimator.unit_chain(problem)
        key = (cell.task.spec, cell.target, cell.seed, "" if chain is problem.chain else cell.estimator.spec)
        if key not in self.units:
            self.units[key] = problem_units(problem, chain)
        units = self.units[key]
        reward = units.reward if cell.estimator.reward_gradient and cost.nfe_vjp > 0 else 0
        peak = cost.predicted_peak_bytes(units.activations, units.state, reward, units.working)
        fields: dict[str, Any] = {
            "mem_plan_bytes": None if peak is None else int(peak),
            "mem_plan_unit_a_bytes": units.activations,
            "mem_plan_unit_w_bytes": units.working,
            "mem_plan_reward_bytes": reward,
        }
        if self.limit is None or peak is None:
            return fields
        footprint = int(units.resident + units.gradients + peak)
        if self.limit == "auto":
            free, source = available_bytes(self.device)
            if free is None:
                return fields
            limit, source = free + units.resident, f"{source} and the problem's own tensors"
        else:
            limit, source = self.limit, "--memory-limit"
        fields.update(mem_fit_pred_bytes=footprint, mem_fit_limit_bytes=limit)
        if footprint > limit:
            raise SkipCell(
                f"predicted not to fit: {format_bytes(footprint)} (resident {format_bytes(units.resident)}, "
                f"gradient {format_bytes(units.gradients)}, peak {format_bytes(peak)} as {cost.memory}) over "
                f"{format_bytes(limit)} ({source}); --memory-limit off runs it anyway",
                fields={**fields, "skip_kind": SKIP_KIND},
            )
        return fields
