"""full: backpropagation through the whole sampling chain (the exact gradient of the discrete
chain, docs/estimators/index.md). Memory N*A, time about NF + NV = 3NF."""

from __future__ import annotations

import random

from bench.capabilities import IN_ORDER
from estimators.base import Cost, Estimate, Estimator, backprop, reached_calls
from estimators.masked_chain import run_masked_chain
from bench.problem import Problem


class Full(Estimator):
    name = "full"
    plot_style = ("#222222", "o")  # colour and marker in every figure
    summary = "backprop through all N denoiser calls (exact; memory grows with N)"
    exact = True
    provides = frozenset({IN_ORDER})

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(nfe_forward=steps, nfe_vjp=reached_calls(steps, target), memory="N·A", activations=steps)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        x0 = run_masked_chain(problem, keep_graph=lambda i: True, keep_latent_path=True)
        return backprop(problem, x0)
