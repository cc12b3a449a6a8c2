"""CPU peak memory of one gradient call, each measured in a fresh forked process.

A long-lived measuring process is not enough: after one large peak (full backprop at N = 20)
glibc's heap keeps the thousands of small autograd allocations it grew for, and later cells
reuse it (sdo then measured 0 MB instead of 13 MB on digits). A fresh interpreter per cell costs
7 s of imports. So a "zygote" process, started once per sweep with MALLOC_MMAP_THRESHOLD_ set
before its interpreter starts (glibc reads it only then), imports everything and sets up tasks but
never computes a gradient; for each cell it forks a child that builds the problem, runs one
warm-up call and one measured call, reports the peak, and exits. Every child starts from the same
clean heap. The zygote also builds each task's schedule once (diffusers imports every scheduler
module on a first `from_config`: half a second each child would pay) and freezes its objects
(`gc.freeze`), so that a child's collection before measuring scans only what the child made.

The zygote runs with one intra-op thread so that no OpenMP pool exists at fork time (a child of a
process with a live pool can hang): memory figures are single-threaded runs of the same code.
The main process waits for the zygote to be idle before timing anything."""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing as mp
import os
import random
import signal
from typing import Any

from bench.errors import exception_text
from bench.run.guard import die_with_parent
from bench.measure.memory import MALLOC_ENV


def one_kept_call(problem) -> object:
    """One denoiser call at x_N with its graph kept: the unit A of the cost model's memory."""
    return problem.chain.eps(problem.x_start, problem.num_steps, problem.cond)


def _measure_in_child(task, request: dict[str, Any]) -> dict[str, Any]:
    from bench.measure.memory import rss_peak_bytes
    from bench.registry import ESTIMATORS

    try:  # SystemExit from a plug-in is a measurement error too, never a silent death
        problem = task.make_problem(request["target"], request["steps"], request["seed"])
        if request.get("unit"):
            one_kept_call(problem)  # warm-up
            return rss_peak_bytes(lambda: one_kept_call(problem))
        estimator = ESTIMATORS.create(request["estimator"])
        rng = random.Random(request["seed"])
        estimator(problem, rng)  # warm-up: first-call allocations are not the estimator's
        problem.zero_grad()
        return rss_peak_bytes(lambda: estimator(problem, rng))
    except BaseException as exc:  # reported; the sweep decides what to do
        return {"error": f"{type(exc).__name__}: {exception_text(exc)}"}


def _fork_and_measure(task, request: dict[str, Any]) -> dict[str, Any]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave without running any exit handlers
        os.close(read_end)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            die_with_parent()
            payload = json.dumps(_measure_in_child(task, request)).encode()
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as source:
        payload = source.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        return {"error": f"memory measurement process died (wait status {status})"}
    return json.loads(payload)


def _serve(conn, includes: list[str]) -> None:
    """The zygote's loop. Ctrl-C reaches the whole process group; the sweep handles it and kills
    this process, so here SIGINT is ignored (no second traceback on the user's terminal)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve_requests(conn, includes)
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        pass  # the sweep went away: leave quietly
    except BaseException as exc:  # said in the rows (mem_error), not as a traceback on the terminal
        try:
            conn.send({"ready": False, "error": f"{type(exc).__name__}: {exception_text(exc)}"})
        except (OSError, EOFError):
            pass


def _serve_requests(conn, includes: list[str]) -> None:
    import torch

    die_with_parent()
    torch.set_num_threads(1)
    from bench.registry import TASKS, include

    for path in includes:
        include(path)  # a SpecError here is sent as the worker's start error by _serve
    tasks: dict[str, Any] = {}
    conn.send({"ready": True})
    while True:
        request = conn.recv()
        if request is None:
            return
        try:
            if request["task"] not in tasks:
                task = TASKS.create(request["task"])
                task.setup(torch.device("cpu"))
                with contextlib.suppress(Exception):  # only a warm-up: a cell reports its own errors
                    task.make_schedule(1)  # the lazy imports of the first schedule, once
                gc.freeze()  # what the children inherit is not theirs to collect
                tasks[request["task"]] = task
        except BaseException as exc:  # sys.exit() in a task's set-up too
            conn.send({"error": f"{type(exc).__name__}: {exception_text(exc)}"})
            continue
        if request.get("setup_only"):
            conn.send({"ready": True})
            continue
        conn.send(_fork_and_measure(tasks[request["task"]], request))


class MemoryWorker:
    def __init__(self, includes: list[str]) -> None:
        self.includes = list(includes)
        self.process = None
        self.conn = None
        self.ready = False
        self.start_error: str | None = None  # the worker could not start (an include failed in it)
        self.tasks_set_up: set[str] = set()

    def _start(self) -> None:
        context = mp.get_context("spawn")
        parent, child = context.Pipe()
        saved = {key: os.environ.get(key) for key in MALLOC_ENV}
        os.environ.update(MALLOC_ENV)
        try:
            self.process = context.Process(target=_serve, args=(child, self.includes), daemon=True)
            self.process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        child.close()
        self.conn, self.ready = parent, False

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until the zygote has started and is idle (call before timing anything)."""
        if self.process is None:
            self._start()
        if self.ready:
            return
        try:
            if self.conn.poll(timeout_s):
                reply = self.conn.recv()
                self.ready = bool(reply.get("ready"))
                if not self.ready:
                    self.start_error = reply.get("error", "no reason given")
                    self.close(kill=True)
        except (EOFError, OSError):
            self.close()

    def prepare(self, task: str, timeout_s: float = 3600.0) -> None:
        """Start the worker and set `task` up in it, so that a cell's measurement is its own."""
        if self.start_error is None and task not in self.tasks_set_up:
            if self.measure({"task": task, "setup_only": True}, timeout_s).get("ready"):
                self.tasks_set_up.add(task)

    def measure(self, request: dict[str, Any], timeout_s: float = 3600.0) -> dict[str, Any]:
        """{'peak': bytes, 'before': bytes} or {'error': message}; a dead or stuck zygote is
        replaced next time. With request['unit'], the measured call is one_kept_call."""
        if self.start_error is not None:  # not restarted for every cell: it would fail the same way
            return {"error": f"memory worker failed to start: {self.start_error}"}
        if self.process is None or not self.process.is_alive():
            self.close()
        self.wait_ready(timeout_s)
        if self.process is None:
            return {"error": f"memory worker failed to start{': ' + self.start_error if self.start_error else ''}"}
        try:
            self.conn.send(request)
            if not self.conn.poll(timeout_s):
                self.close()
                return {"error": f"memory measurement took over {timeout_s:.0f} s"}
            return self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            return {"error": f"memory worker died ({type(exc).__name__})"}
        except BaseException:  # a cell timeout or Ctrl-C mid-measurement: the zygote is mid-request
            self.close(kill=True)
            raise

    def close(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if not kill:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.process = None
        self.conn = None
        self.ready = False
        self.tasks_set_up = set()
