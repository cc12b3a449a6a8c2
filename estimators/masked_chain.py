"""One engine for the estimators that differ only in which denoiser calls keep their graph
(ESTIMATORS.md, 'A unifying view'): full, checkpoint and truncated are masks over it.

- keep_graph(i): does the denoiser call at grid point i keep its graph?
- keep_latent_path: across the other calls, does the linear DDIM arithmetic x_{i-1} = a_i x_i + ...
  stay in the graph (an identity path back to x_N), or is the latent detached?
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


def run_masked_chain(problem: Problem, keep_graph: Callable[[int], bool], keep_latent_path: bool,
                     checkpoint: bool = False) -> Tensor:
    chain, schedule, cond = problem.chain, problem.chain.schedule, problem.cond
    x = problem.x_start
    for i in range(schedule.num_steps, 0, -1):
        noise = noise_for(problem.noises, i)
        if keep_graph(i):
            def kept_step(x_i: Tensor, i: int = i, noise: Tensor | None = noise) -> Tensor:
                return schedule.step(x_i, i, chain.eps(x_i, i, cond), noise)

            x = recompute_in_backward(kept_step, x, use_reentrant=False) if checkpoint else kept_step(x)
        else:
            with torch.no_grad():
                eps = chain.eps(x.detach(), i, cond)
            cut = not keep_latent_path and not schedule.is_identity(i)
            x = schedule.step(x.detach() if cut else x, i, eps, noise)
    return x
