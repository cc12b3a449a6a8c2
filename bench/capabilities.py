"""Capabilities: what a problem requires of an estimator beyond the contract, and what an
estimator needs of a problem beyond the chain. Methods bring them, the core types only carry the
names:

- a problem's `requires` (name -> why): e.g. `in-order`, a denoiser that must be called along the
  sampler's grid, N..1 in one pass (a stateful denoiser); only estimators whose `provides` holds
  the name serve it;
- an estimator's `needs` (name -> what it is): e.g. `few-step-chain`, a K-step chain of (a
  distilled copy of) the task's model; only problems whose `extras` hold the name can be served, and a task's `offers()` says
  which it can attach (checked before anything runs).

`unmet` is the one place that decides, and that lists the estimators serving a requirement."""

from __future__ import annotations

from typing import Any

IN_ORDER = "in-order"  # the denoiser is called only on the sampler's grid, N..1, in one pass per call
# an extra: K -> a K-step Chain of (a distilled copy of) the task's model sharing the problem's
# leaves, built once per K; a task's offers() gives the K it ships
FEW_STEP_CHAIN = "few-step-chain"
# an extra beside it: the largest trajectory error (tasks/shortcut/check.py) the task accepts of its
# student; absent: no bound, the error is only reported
FEW_STEP_BOUND = "few-step-bound"
# what an estimator without a capability does instead, for the skip reason
WITHOUT = {IN_ORDER: "calls the denoiser out of the sampler's order (a step alone, off the grid, or another chain)"}


def serving(capability: str) -> list[str]:
    """The registered estimators that provide `capability`."""
    from bench.registry import ESTIMATORS

    return [name for name in ESTIMATORS.names() if capability in ESTIMATORS.get(name).provides]


def unmet(estimator: Any, problem: Any) -> str | None:
    """Why `estimator` cannot serve `problem`: a requirement it does not provide, its own skip
    reason, or an extra it needs that the problem lacks; None if it can."""
    for capability, why in problem.requires.items():
        if capability not in estimator.provides:
            lacks = WITHOUT.get(capability, f"does not provide {capability!r}")
            return (
                f"{estimator.name} {lacks}, and {why}; estimators that serve it: "
                f"{', '.join(serving(capability)) or 'none'}"
            )
    reason = estimator.skip_reason(problem)
    if reason:
        return reason
    for need, what in estimator.needs.items():
        if need not in problem.extras:
            return f"{estimator.name} needs {what} ({need!r}), which this problem does not have"
    return None
