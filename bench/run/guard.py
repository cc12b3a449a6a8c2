"""What code running in the sweep's process (a plug-in's estimator, task or reward) may not do to
the sweep: end it with os._exit, fork a copy of it that carries on running cells and writing rows,
or leave a process behind that keeps the sweep's output open after it ends. Inside `guarded()`:

- os._exit(n) called in the sweep's process raises PluginExit instead, so the cell fails with a
  row (a forked child's os._exit still exits that child);
- a forked copy that returns into the sweep leaves at once (`leave_if_forked`), writing nothing;
- processes the cells started and left running are killed after each point (`end_strays`); the
  sweep becomes its descendants' subreaper (Linux), so an orphaned grandchild is found too.

The /proc and prctl parts are Linux's; elsewhere they do nothing."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_real_exit = os._exit
_owner: int | None = None  # the sweep's pid while guarded


class PluginExit(Exception):
    """os._exit called by code running in the sweep's process."""


def _guarded_exit(status: int) -> None:
    if _owner is None or os.getpid() != _owner:
        _real_exit(status)
    raise PluginExit(f"os._exit({status}) was called in the sweep's process; a cell cannot end the sweep")


def _prctl(option: int, value: int) -> bool:
    """Linux's prctl(option, value); False where it failed or there is none."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _subreaper(on: bool) -> None:
    _prctl(_PR_SET_CHILD_SUBREAPER, int(on))


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent ends (Linux PR_SET_PDEATHSIG), so that
    no orphan computes on; False where it cannot."""
    return _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextmanager
def guarded() -> Iterator[None]:
    """The sweep's process, guarded while cells run in it (re-entrant)."""
    global _owner
    if _owner == os.getpid():
        yield
        return
    _owner, os._exit = os.getpid(), _guarded_exit
    _subreaper(True)
    try:
        yield
    finally:
        if os.getpid() == _owner:
            _subreaper(False)
            _owner, os._exit = None, _real_exit


def leave_if_forked() -> None:
    """Called after code of a cell ran: a forked copy of the sweep ends here, silently, without
    flushing the buffers it shares with the sweep."""
    if _owner is not None and os.getpid() != _owner:
        _real_exit(0)


def children() -> set[int]:
    """The pids of this process's children (Linux: /proc; elsewhere none known)."""
    found: set[int] = set()
    for task in Path("/proc/self/task").glob("*"):
        try:
            found.update(int(pid) for pid in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return found


def harness_children() -> set[int]:
    """Children the harness itself runs: multiprocessing's (the memory worker, cell processes)
    and its resource tracker."""
    pids = {p.pid for p in multiprocessing.active_children() if p.pid}
    try:
        from multiprocessing import resource_tracker

        tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
        if tracker:
            pids.add(tracker)
    except (ImportError, AttributeError):
        pass
    return pids


def end_strays(before: set[int]) -> list[int]:
    """Kill and reap the children started since `before` was taken that the harness does not own:
    what a cell's code left running. Returns their pids."""
    strays = sorted(children() - before - harness_children())
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError, PermissionError):
            pass
    return strays
