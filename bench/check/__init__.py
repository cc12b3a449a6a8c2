"""The conformance suites: what every plug-in of an extension point must satisfy, built in or your own.

- `bench.check.samplers`: a sampler (bench/samplers/) against the diffusers scheduler it stands for,
  over several noise tables and step counts (trajectory, linear weights, ODE grid, model times,
  identity steps, purity, refusals), in the style of diffusers' scheduler test mixin;
- `bench.check.tasks`: a task (tasks/) against the task contract (fresh problems, the target's
  leaves and nothing else requiring grad, untimed evaluation, a stable data fingerprint, images
  and rewards in range, float64 problems for the float64 reference);
- the estimators' suite (bench/check/estimators.py) reads the same way.

Each suite returns a list of `Check`: one row per (plug-in spec, check), pass, fail or n/a, with a
detail that gives the numbers the check measured. Nothing here is timed; the suites run on one CPU
thread (`torch_threads`), restored afterwards."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from bench.errors import exception_text


@dataclass
class Check:
    spec: str  # the plug-in checked (a sampler or task spec)
    name: str
    status: str  # pass, fail, n/a
    detail: str = ""

    @property
    def estimator(self) -> str:  # the field name of bench.check.estimators.Check, so either prints alike
        return self.spec


class Failed(Exception):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def run_check(checks: list[Check], spec: str, name: str, fn: Callable[[], Any]) -> None:
    """Run one check, appending its row: a returned string is a pass with that detail, a returned
    (status, detail) pair is that row; Failed is a fail with its message, any other exception a fail
    that names it (the plug-in crashed)."""
    try:
        detail = fn()
        status = "pass"
        if isinstance(detail, tuple):
            status, detail = detail
        checks.append(Check(spec, name, status, detail or ""))
    except Failed as exc:
        checks.append(Check(spec, name, "fail", str(exc)))
    except Exception as exc:
        checks.append(Check(spec, name, "fail", f"{type(exc).__name__}: {exception_text(exc)}"))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `threads` (None: unchanged) for the block, then restored. The
    suites run small tensors, where a thread pool on a busy machine only waits: one thread is
    several times faster there."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def print_checks(checks: list[Check], console: Any, title: str, kind: str) -> None:
    """The suite's table (as bench.check.estimators.print_checks) and a closing line naming the failures."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for column in (kind, "check", "result", "detail"):
        table.add_column(column, overflow="fold")
    colours = {"pass": "green", "fail": "bold red", "n/a": "dim"}
    for check in checks:
        table.add_row(
            escape(check.spec), escape(check.name), f"[{colours[check.status]}]{check.status}[/]", escape(check.detail)
        )
    console.print(table)
    failed = sorted({c.spec for c in checks if c.status == "fail"})
    console.print(
        f"{len({c.spec for c in checks})} {kind}(s), "
        + (f"[bold red]failing: {', '.join(failed)}[/]" if failed else "[green]all checks pass[/]")
    )
