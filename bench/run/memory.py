"""Peak memory of one gradient, and the cost model's memory units, measured the same way.

The meter chooses how (`--memory`): on a CPU, the peak resident memory of a process forked per
cell from a clean worker (bench/run/memworker.py); on CUDA, the allocator's own counters; in process,
the resident high-water mark. It also measures the units of the memory model (docs/estimators/index.md):
A, the peak of one denoiser call with its graph kept, and S, one latent; a row's prediction is
activations·A + latents·S from the estimator's Cost."""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from bench.measure.memory import cuda_peak_bytes, rss_peak_bytes, rss_supported, tensor_bytes
from bench.planner.live import resident_tensors
from bench.run.memworker import MemoryWorker, one_kept_call

MODES = {
    "auto": "process on CPU, inprocess on CUDA",
    "process": "CPU: peak resident memory of a process forked per cell from a clean worker",
    "inprocess": "CUDA: the allocator's peak; CPU: resident high-water mark in the sweep's own "
    "process (heap reuse can hide memory)",
    "off": "no memory measurement",
}


class MemoryMeter:
    def __init__(self, mode: str, device: torch.device, includes: list[str]) -> None:
        self.device = device
        if mode == "auto":
            mode = "inprocess" if device.type == "cuda" else "process"
        if mode in ("process", "inprocess") and device.type == "cpu" and not rss_supported():
            mode = "unavailable"
        self.mode = mode
        self.worker = MemoryWorker(includes) if mode == "process" else None
        self.units: dict[tuple, dict[str, Any]] = {}

    def wait_idle(self) -> None:
        """Block until the worker process (if any) is started and idle: call before timing."""
        if self.worker is not None:
            self.worker.wait_ready()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def prepare(self, cell) -> None:
        """The worker started and the cell's task set up in it: shared work, done before the cell's
        own measurement so that its time is not the cell's (nor counted against its --timeout)."""
        if self.worker is not None:
            self.worker.prepare(cell.task.spec)

    def measure(self, cell, problem, rng: random.Random, cost) -> dict[str, Any]:
        """The row's memory fields: the peak of one gradient call and the model's prediction."""
        fields: dict[str, Any] = {"mem_baseline_bytes": tensor_bytes(resident_tensors(problem))}
        if self.mode in ("off", "unavailable"):
            return {**fields, "peak_mem_bytes": None, "mem_kind": self.mode}
        if self.mode == "process":
            result = self.worker.measure(
                {
                    "task": cell.task.spec,
                    "estimator": cell.estimator.spec,
                    "target": cell.target,
                    "steps": cell.steps,
                    "seed": cell.seed,
                }
            )
            kind = "rss_peak"
        else:
            problem.zero_grad()
            result = self._inprocess_peak(lambda: cell.estimator(problem, rng))
            kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak_inprocess"
        if "error" in result:
            return {**fields, "peak_mem_bytes": None, "mem_kind": kind, "mem_error": result["error"]}
        fields.update(peak_mem_bytes=result["peak"], mem_process_before_bytes=result["before"], mem_kind=kind)
        if "reserved" in result:
            fields["mem_reserved_peak_bytes"] = result["reserved"]
        unit_a = self.unit_activation(cell, problem)
        unit_s = problem.x_start.numel() * problem.x_start.element_size()
        return {
            **fields,
            "mem_unit_a_bytes": unit_a,
            "mem_unit_s_bytes": unit_s,
            "mem_pred_bytes": cost.predicted_bytes(unit_a, unit_s),
        }

    def _inprocess_peak(self, fn: Callable[[], object]) -> dict[str, int]:
        if self.device.type == "cuda":
            return cuda_peak_bytes(fn, self.device)
        return rss_peak_bytes(fn)

    def unit_activation(self, cell, problem) -> float | None:
        """A: peak memory of one denoiser call with its graph kept (cached per task, target, seed)."""
        key = (cell.task.spec, cell.target, cell.seed)
        if key not in self.units:
            if self.mode == "process":
                self.units[key] = self.worker.measure(
                    {
                        "task": cell.task.spec,
                        "target": cell.target,
                        "steps": cell.steps,
                        "seed": cell.seed,
                        "unit": True,
                    }
                )
            else:
                one_kept_call(problem)  # warm-up
                self.units[key] = self._inprocess_peak(lambda: one_kept_call(problem))
        return self.units[key].get("peak")
