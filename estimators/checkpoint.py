"""checkpoint: backprop through the whole chain, recomputing each step's graph during backward
(torch.utils.checkpoint, non-reentrant; ESTIMATORS.md section 2). The same gradient as `full` to
float rounding. Memory A + N*S, time about 2NF + NV = 4NF."""
from __future__ import annotations

import random

from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop
from estimators.masked_chain import run_masked_chain


class Checkpoint(Estimator):
    name = "checkpoint"
    summary = "exact backprop, each step recomputed in backward (memory A + N·S)"
    exact = True

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(nfe_forward=2 * steps, nfe_vjp=steps, memory="A + N·S", activations=1, latents=steps)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        x0 = run_masked_chain(problem, keep_graph=lambda i: True, keep_latent_path=True,
                              checkpoint=True)
        return backprop(problem, x0)
