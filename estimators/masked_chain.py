"""One engine for the estimators that differ only in which denoiser calls keep their graph
(docs/estimators/index.md, 'A unifying view'): full, checkpoint and truncated are masks over it.

- keep_graph(i): does the denoiser call at grid point i keep its graph?
- keep_latent_path: across the other calls, does the sampler's affine arithmetic (x_{i-1} from x_i
  and, for a multistep solver, its history) stay in the graph, a linear path back to x_N, or is
  the state detached?
- checkpoint: store each kept step's graph (False) or recompute it during backward (True).

An identity step (Schedule.is_identity: the denoiser output has weight 0) never cuts the latent
path, whatever the mask: there is nothing to truncate there, and detaching at the final identity
step of a leading-spacing schedule would silently zero every gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from bench.chain import noise_for
from bench.problem import Problem


def run_masked_chain(
    problem: Problem, keep_graph: Callable[[int], bool], keep_latent_path: bool, checkpoint: bool = False
) -> Tensor:
    chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
    state = schedule.start(problem.x_start)
    for i in range(schedule.num_steps, 0, -1):
        noise = noise_for(problem.noises, i)
        if keep_graph(i):

            def kept_step(*state_i: Tensor, i: int = i, noise: Tensor | None = noise) -> tuple[Tensor, ...]:
                return schedule.advance(state_i, i, chain.eps(state_i[0], i, cond), noise)

            state = recompute_in_backward(kept_step, *state, use_reentrant=False) if checkpoint else kept_step(*state)
        else:
            with torch.no_grad():
                out = chain.eps(state[0].detach(), i, cond)
            if not keep_latent_path and not schedule.is_identity(i):
                state = tuple(part.detach() for part in state)
            state = schedule.advance(state, i, out, noise)
    return state[0]
