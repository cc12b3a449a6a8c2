"""What ends a cell early: its time limit (spent across the phases that interleaved timing splits
it into), and how a failure becomes the cell's row instead of the sweep's end. Only the user's
Ctrl-C (a real SIGINT) stops a sweep."""

from __future__ import annotations

import signal
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any

import torch

from bench.errors import Diverged, SkipCell, exception_text


class CellTimeout(Exception):
    pass


_user_interrupts: list[int] = []  # SIGINTs received during the sweep (see sigint_recorded)


@contextmanager
def sigint_recorded():
    """Tell the user's Ctrl-C (a real SIGINT) apart from a KeyboardInterrupt an estimator raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        _user_interrupts.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _user_interrupts.clear()


def is_user_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, KeyboardInterrupt) and bool(_user_interrupts)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure on any device: torch's OutOfMemoryError (CUDA, MPS, XPU), Python's
    MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = exception_text(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def outcome(exc: BaseException) -> dict[str, Any]:
    """The row fields of a cell that ended with `exc` (re-raised if it is the user's Ctrl-C)."""
    if is_user_interrupt(exc):
        raise exc
    if isinstance(exc, SkipCell):
        return {**getattr(exc, "fields", {}), "status": "skipped", "reason": exception_text(exc)}
    if isinstance(exc, Diverged):
        return {"status": "diverged", "error": exception_text(exc)}
    if isinstance(exc, CellTimeout):
        return {"status": "timeout", "error": exception_text(exc)}
    text = exception_text(exc)
    message = text.splitlines()[0] if text.strip() else type(exc).__name__
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)
    return {
        "status": "oom" if is_out_of_memory(exc) else "error",
        "error": message,
        "error_type": type(exc).__name__,
        "traceback": "".join(lines),
    }


@contextmanager
def time_limit(seconds: float | None, total: float | None = None):
    """Raise CellTimeout in the main thread after `seconds` (a SIGALRM timer; the exception
    surfaces at the next Python-level instruction, so within one denoiser call)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CellTimeout(f"cell exceeded the {total or seconds:g} s limit (--timeout)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


SHARED_PHASES = ("harness", "units")  # shared work charged to a point's cells, not their own


class Clock:
    """A cell's time: its limit (None or 0: none) over its own phases, and the seconds of each
    named phase (the row's `phase_s`), shared ones included. The shared ones (the harness's own
    work and waits, the time model's units, split between a point's cells) do not count against
    the limit: one cell's slow plug-in must not time out the others."""

    def __init__(self, limit: float | None) -> None:
        self.limit = limit or None
        self.phases: dict[str, float] = {}

    @property
    def spent(self) -> float:
        return sum(self.phases.values())

    @property
    def own(self) -> float:
        return sum(seconds for name, seconds in self.phases.items() if name not in SHARED_PHASES)

    def charge(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    @contextmanager
    def accounting(self):
        """Charge the block's wall time that no phase inside it took to `harness`."""
        start, inside = time.perf_counter(), self.spent
        try:
            yield
        finally:
            self.charge("harness", time.perf_counter() - start - (self.spent - inside))

    @contextmanager
    def phase(self, name: str):
        remaining = None if self.limit is None else self.limit - self.own
        if remaining is not None and remaining <= 0:
            raise CellTimeout(f"cell exceeded the {self.limit:g} s limit (--timeout)")
        start = time.perf_counter()
        try:
            with time_limit(remaining, self.limit):
                yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
