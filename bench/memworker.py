"""A long-lived worker process that measures CPU peak memory of one gradient call per request.

It is started once per sweep with MALLOC_MMAP_THRESHOLD_ set before the interpreter starts (the
setting only takes effect at start-up), so timing in the main process is not slowed by it.
The resident high-water rise then tracks live tensor bytes and repeats within one process
(MACHINE-FACTS.md; bench/measure.py says why the threshold is one page here)."""
from __future__ import annotations

import multiprocessing as mp
import os
import random
from typing import Any

from bench.measure import MALLOC_ENV


def _serve(conn, includes: list[str]) -> None:
    import torch

    from bench.measure import rss_peak_bytes
    from bench.registry import ESTIMATORS, TASKS, include

    for path in includes:
        include(path)
    tasks: dict[str, Any] = {}
    while True:
        request = conn.recv()
        if request is None:
            return
        try:
            task = tasks.get(request["task"])
            if task is None:
                task = tasks[request["task"]] = TASKS.create(request["task"])
                task.setup(torch.device("cpu"))
            estimator = ESTIMATORS.create(request["estimator"])
            problem = task.make_problem(request["target"], request["steps"], request["seed"])
            rng = random.Random(request["seed"])
            estimator(problem, rng)  # warm-up: first-call allocations are not the estimator's
            problem.zero_grad()
            conn.send({"peak": rss_peak_bytes(lambda: estimator(problem, rng))})
        except Exception as exc:  # reported, the sweep decides what to do
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


class MemoryWorker:
    def __init__(self, includes: list[str]) -> None:
        self.includes = list(includes)
        self.process = None
        self.conn = None

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
        self.conn = parent

    def measure(self, request: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
        """{'peak': bytes} or {'error': message}; a crashed worker is restarted next time."""
        if self.process is None or not self.process.is_alive():
            self._start()
        try:
            self.conn.send(request)
            if not self.conn.poll(timeout_s):
                self.close(kill=True)
                return {"error": f"memory measurement took over {timeout_s:.0f} s"}
            return self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
            self.close(kill=True)
            return {"error": f"memory worker died ({type(exc).__name__})"}

    def close(self, kill: bool = False) -> None:
        if self.process is None:
            return
        try:
            if not kill:
                self.conn.send(None)
                self.process.join(timeout=5)
        except (BrokenPipeError, OSError):
            pass
        if self.process.is_alive():
            self.process.kill()
        self.process = None
        self.conn = None


