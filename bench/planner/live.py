"""The cost model's memory units counted on a live problem (the task's own model, real tensors, one
call each), for the cells of a sweep: what `run` compares with the device's memory before a cell
computes anything (bench/run/fit.py), and what its prediction is checked against.

- A: the bytes autograd keeps for one denoiser call at x_N with the cell's target requiring grad,
  counted once per storage, only storages the call itself allocated (the weights, buffers, the
  latent and the conditioning are resident already);
- W: the call's working memory without a graph: the peak of the bytes its ops' outputs hold alive
  at once during a no-grad call (a lower bound: buffers a kernel allocates inside itself are not
  seen);
- the reward's graph: what autograd keeps for the loss of one x_0 (a VAE decode, a reward model);
- S: one latent; the gradient: the bytes of the target's leaves."""

from __future__ import annotations

from dataclasses import dataclass

from bench.planner.units import Allocations, SavedBytes, working_bytes


@dataclass(frozen=True)
class ProblemUnits:
    activations: int  # A
    working: int  # W
    reward: int  # the reward's graph for one x_0
    state: int  # S
    gradients: int  # the target's gradient
    resident: int  # the problem's own tensors: the denoiser's weights and buffers, x_N, c, the noises


def saved_bytes(fn) -> int:
    """Bytes of the storages autograd saves while fn() runs that fn itself allocated, once each."""
    saved = SavedBytes(exclude=set())
    with Allocations() as allocations, saved.counting():
        result = fn()
    del result
    return sum(size for key, size in saved.seen.items() if key in allocations.created)


def problem_units(problem, chain=None) -> ProblemUnits:
    """The units of one problem (its denoiser at its batch, its target, its reward); A and W of the
    calls of `chain` (an estimator that differentiates another chain than the problem's, such as a
    distilled student's: Estimator.unit_chain)."""
    from bench.measure.memory import tensor_bytes

    chain = chain or problem.chain

    def call():
        return chain.eps(problem.x_start, chain.schedule.num_steps, problem.cond)

    x0 = problem.x_start.detach().clone().requires_grad_(True)
    return ProblemUnits(
        activations=saved_bytes(call),
        working=working_bytes(call),
        reward=saved_bytes(lambda: problem.loss(x0)[0]),
        state=problem.x_start.numel() * problem.x_start.element_size(),
        gradients=tensor_bytes(problem.leaves),
        resident=tensor_bytes(resident_tensors(problem)),
    )


def resident_tensors(problem):
    """What a problem holds before any gradient: the denoiser's weights and buffers, x_N, c, the noises."""
    yield from problem.chain.denoiser.parameters()
    yield from problem.chain.denoiser.buffers()
    yield problem.x_start
    if problem.cond is not None:
        yield problem.cond
    yield from problem.noises or ()
