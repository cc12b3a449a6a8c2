"""Time per gradient: device-synchronised rounds, interleaved between the estimators of one point,
each round checked for other load on the machine, repeated when it was slowed, and stopped at a
fixed count or when the spread is small enough; ratios to a baseline from rounds that were
neighbours in time, with a bootstrap interval; and the time model's units F and V.

Contention. Every round records how many cores other processes kept busy while it ran: the
machine's busy CPU time (/proc/stat) minus this process's own (os.times), over the round's wall
time. A round is slowed when that load leaves fewer free cores than the timing's threads need
(`others > cpus - threads + CONTENTION_MARGIN`): torch's OpenMP threads wait for each other at
every parallel region, so one core taken from a two-thread run on two cores slows it 10 to 50
times, while a one-thread run beside the same load is unaffected (docs/methodology.md, "Timing"). Slowed
rounds are left out of every figure and repeated; a row that could not get enough clean rounds
says so in `timing_suspect`. A round too short for the kernel's CPU accounting (ticks of 1/HZ s) is
judged over a window that ends with it and is long enough (it may include the rounds before it)."""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.measure.memory import synchronize

CONTENTION_MARGIN = 0.25  # cores of other load tolerated beyond the cores the timing leaves free
MAX_ROUNDS = 200  # a hard stop for --stable
BOOTSTRAP_RESAMPLES = 2000


def median_iqr(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q3 - q1


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LoadProbe:
    """Cores kept busy by other processes over an interval (Linux /proc/stat); None elsewhere."""

    def __init__(self) -> None:
        self.supported = Path("/proc/stat").is_file()
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK") if self.supported else 0.0
        self.cpus = os.cpu_count() or 1

    def snapshot(self) -> tuple[float, float, float]:
        """(machine busy CPU seconds, this process's CPU seconds, wall clock read last)."""
        busy = 0.0
        if self.supported:
            with open("/proc/stat") as stat:
                fields = stat.readline().split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            busy = (user + nice + system + irq + softirq + steal) * self.tick
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def min_interval(self) -> float:
        """The shortest interval whose load figure is within ~0.1 core of the truth: each of the
        machine's and the process's counters is off by up to one tick per core."""
        return 20 * self.tick * self.cpus

    def others(self, before, after) -> float | None:
        wall = after[2] - before[2]
        if not self.supported or wall <= 0:
            return None
        return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


@dataclass
class Rounds:
    """One estimator's timed rounds: seconds, the pass each ran in, and whether it was slowed."""

    seconds: list[float] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    slowed: list[bool] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # cores busy elsewhere, per judged round
    error: BaseException | None = None
    stop: str = ""
    suspect: str | None = None

    @property
    def clean(self) -> list[float]:
        return [s for s, bad in zip(self.seconds, self.slowed) if not bad]

    def clean_by_pass(self) -> dict[int, float]:
        return {p: s for p, s, bad in zip(self.passes, self.seconds, self.slowed) if not bad}

    def spread(self) -> float:
        clean = self.clean
        if len(clean) < 2:
            return float("inf")
        median, iqr = median_iqr(clean)
        return iqr / median if median > 0 else 0.0

    def summary(self) -> dict[str, object]:
        """The row's timing fields."""
        kept = self.clean or self.seconds
        median, iqr = median_iqr(kept)
        fields = {
            "time_s": median,
            "time_iqr_s": iqr,
            "time_min_s": min(kept),
            "time_rounds_s": kept,
            "time_rounds_slowed": sum(self.slowed),
            "time_stop": self.stop,
        }
        if self.others:
            fields["time_others_cores"] = max(self.others)
        if self.suspect:
            fields["timing_suspect"] = self.suspect
        return fields


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int,
    threads: int,
    stable: float = 0.0,
    cap_s: float = 0.0,
    warmup: int = 0,
    probe: LoadProbe | None = None,
    fatal: Callable[[BaseException], bool] = lambda exc: isinstance(exc, KeyboardInterrupt),
) -> dict[str, Rounds]:
    """Time every call round-robin: pass p times each call once, starting at a rotating position
    so that no call always follows the same neighbour. Stop when every call has `rounds` clean
    rounds and, with `stable` > 0, the IQR of its clean rounds is within `stable` of their median,
    or when `cap_s` seconds (0: no cap) or MAX_ROUNDS passes are spent. Slowed rounds are repeated
    (at most `rounds` extra passes beyond what stopping needs). A call that raises leaves the
    rotation; its exception is kept in its Rounds, unless `fatal(exception)` (the user's Ctrl-C)."""
    probe = probe or LoadProbe()
    free = max(0, usable_cpus() - threads)
    results = {name: Rounds() for name in calls}
    live = list(calls)
    history = [probe.snapshot()]  # load snapshots (from before the warm-up) around every call, in order
    for name in list(live):
        try:
            for _ in range(warmup):
                calls[name]()
        except BaseException as exc:
            if fatal(exc):
                raise
            results[name].error = exc
            live.remove(name)
    started, passes, extra = time.perf_counter(), 0, 0
    while live:
        order = live[passes % len(live) :] + live[: passes % len(live)]
        for name in order:
            try:
                synchronize(device)
                before = probe.snapshot()
                calls[name]()
                synchronize(device)
                end = time.perf_counter()  # before reading the counters: their cost is not the call's
                after = probe.snapshot()[:2] + (end,)
            except BaseException as exc:
                if fatal(exc):
                    raise
                results[name].error = exc
                live.remove(name)
                continue
            history += [before, after]
            record = results[name]
            record.seconds.append(after[2] - before[2])
            record.passes.append(passes)
            others = _others_around(probe, history)
            record.slowed.append(others is not None and others > free + CONTENTION_MARGIN)
            if others is not None:
                record.others.append(others)
        passes += 1
        elapsed = time.perf_counter() - started
        short = [n for n in live if len(results[n].clean) < rounds]
        unstable = [n for n in live if stable > 0 and results[n].spread() > stable]
        if short and any(results[n].slowed[-1] for n in short):
            extra += 1
        if not short and not unstable:
            stop = "stable" if stable > 0 else "rounds"
        elif cap_s and elapsed >= cap_s:
            stop = "cap"
        elif passes >= MAX_ROUNDS or (not unstable and extra > rounds):
            stop = "max_rounds" if passes >= MAX_ROUNDS else "retries"
        else:
            continue
        for name in live:
            results[name].stop = stop
        break
    phase_others = probe.others(history[0], probe.snapshot())
    for record in results.values():
        _judge(record, rounds, free, phase_others, probe)
    return results


def _others_around(probe: LoadProbe, history: list) -> float | None:
    """Cores other processes kept busy over the last `min_interval` seconds up to the end of the
    round just recorded (history[-1]): the round itself, widened backwards where it is too short
    for the kernel's tick accounting. None while less than that has been recorded."""
    end = history[-1]
    for start in reversed(history[:-1]):
        if end[2] - start[2] >= probe.min_interval():
            return probe.others(start, end)
    return None


def _judge(record: Rounds, rounds: int, free: int, phase_others: float | None, probe: LoadProbe) -> None:
    if not record.seconds:
        return
    slowed = sum(record.slowed)
    if len(record.clean) < rounds:
        record.suspect = (
            f"only {len(record.clean)} of {len(record.seconds)} rounds ran without other load "
            f"(up to {max(record.others, default=0):.1f} cores busy elsewhere, {free} free)"
        )
    elif not record.others and phase_others is not None and phase_others > free + CONTENTION_MARGIN:
        record.suspect = (
            f"rounds shorter than {probe.min_interval():.2f} s ran while other processes kept "
            f"{phase_others:.1f} cores busy ({free} free)"
        )
    elif slowed:
        record.stop += f" ({slowed} slowed rounds repeated)"


def paired_ratio(numerator: Rounds, baseline: Rounds, seed: int = 0) -> dict[str, float] | None:
    """Ratio of median times over the passes where both ran clean, with a 95 % percentile
    bootstrap interval over those passes (resampled in pairs, so shared slow-downs cancel)."""
    a, b = numerator.clean_by_pass(), baseline.clean_by_pass()
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    xs, ys = [a[p] for p in shared], [b[p] for p in shared]
    ratio = statistics.median(xs) / statistics.median(ys)
    if len(shared) < 2:
        return {"ratio": ratio, "pairs": 1}
    rng = random.Random(seed)
    draws = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        picks = [rng.randrange(len(shared)) for _ in shared]
        draws.append(statistics.median([xs[i] for i in picks]) / statistics.median([ys[i] for i in picks]))
    draws.sort()
    return {
        "ratio": ratio,
        "lo": draws[int(0.025 * len(draws))],
        "hi": draws[int(0.975 * len(draws)) - 1],
        "pairs": len(shared),
    }


UNIT_CALLS = ("unit F", "unit F+V", "unit checkpointed F+V")


def unit_calls(problem) -> dict[str, Callable[[], None]]:
    """The calls that measure the time model's units on this problem's denoiser, batch and target,
    timed in the same passes as the estimators (so a machine that drifts moves both): one forward
    without graph (F); one forward with graph and the backward into the state and the target's
    leaves (F + V); the same under torch's non-reentrant checkpoint, whose first pass records a
    graph through pack/unpack hooks and whose replay runs inside them (2F + V + 2H). They leave
    the problem's counters as they were."""
    from torch.utils.checkpoint import checkpoint

    x = problem.x_start.detach().clone().requires_grad_(True)
    inputs = [x] + [leaf for leaf in problem.leaves if leaf is not problem.x_start]
    chain, step = problem.chain, problem.num_steps

    def uncounted(fn):
        def call():
            counts = (chain.counter.forward, chain.counter.vjp)
            try:
                fn()
            finally:
                chain.counter.forward, chain.counter.vjp = counts

        return call

    def eps(z):
        return chain.eps(z, step, problem.cond)

    def forward():
        with torch.no_grad():
            eps(x)

    def forward_backward(output):
        torch.autograd.grad(output, inputs, torch.ones_like(output), allow_unused=True)

    calls = (
        forward,
        lambda: forward_backward(eps(x)),
        lambda: forward_backward(checkpoint(eps, x, use_reentrant=False)),
    )
    return dict(zip(UNIT_CALLS, map(uncounted, calls)))


def units_from(results: dict[str, Rounds]) -> dict[str, float] | None:
    """F, V and H (seconds) from the unit calls' rounds; None if any of them failed."""
    medians = {}
    for name in UNIT_CALLS:
        record = results.get(name)
        if record is None or record.error is not None or not record.seconds:
            return None
        medians[name] = statistics.median(record.clean or record.seconds)
    f, fv = medians["unit F"], medians["unit F+V"]
    return {"F": f, "V": max(0.0, fv - f), "H": max(0.0, (medians["unit checkpointed F+V"] - f - fv) / 2)}


def denoiser_units(problem, device: torch.device, rounds: int = 5) -> dict[str, float]:
    """The units alone (medians of `rounds` interleaved passes after one warm-up)."""
    results = time_interleaved(unit_calls(problem), device, rounds=rounds, threads=torch.get_num_threads(), warmup=1)
    units = units_from(results)
    if units is None:
        raise next(r.error for r in results.values() if r.error is not None)
    return units
