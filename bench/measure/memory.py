"""Memory measurement primitives (bench/run/memory.py chooses among them). On CUDA: the allocator's
own peak above the pre-call baseline. Memory on CPU: the process's resident high-water mark above the pre-call
resident size, in a worker process started with glibc's mmap threshold at one page, so that every
tensor of a page or more gets its own mapping, returned to the OS when freed, and the high-water
mark tracks live tensor bytes (see bench/run/memworker.py). With a 64 KiB threshold
(tried first), smaller tensors (a 32x128 float64 latent is 32 KiB) come from the heap, reuse
chunks freed by the warm-up call, and vanish from the figure: checkpoint's N*S measured 0 there."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096"}  # glibc reads it once, at process start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> dict[str, int]:
    """{'peak': bytes allocated by CUDA at the peak during fn above what was allocated before it,
    'before': that baseline, 'reserved': the caching allocator's peak reserved bytes (what
    nvidia-smi sees, fragmentation included)}."""
    gc.collect()
    torch.cuda.empty_cache()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return {
        "peak": torch.cuda.max_memory_allocated(device) - baseline,
        "before": baseline,
        "reserved": torch.cuda.max_memory_reserved(device),
    }


def rss_supported() -> bool:
    return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def rss_peak_bytes(fn: Callable[[], object]) -> dict[str, int]:
    """{'peak': resident high-water mark during fn above the resident size before it, 'before':
    that resident size} (Linux; meaningful in a process started with MALLOC_ENV)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the high-water mark VmHWM to the current VmRSS
    baseline = _status_bytes("VmRSS")
    fn()
    return {"peak": _status_bytes("VmHWM") - baseline, "before": baseline}


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among tensors (what a problem holds before any gradient)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
