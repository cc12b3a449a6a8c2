"""dno: Direct Noise Optimization (DNO, arXiv 2405.18881; docs/estimators/index.md).

Optimise the initial latent and every injected noise of the eta > 0 sampler (target `noise`;
`latent` at eta = 0 is the same with no injected noise) by backprop through the whole chain,
checkpointed per step (memory A + N*S, time about 4NF), as the reference code does.

With reg = gamma > 0 the loss gains DNO's probability regulariser, which keeps the optimised
noise where a standard Gaussian would put it (against reward hacking by out-of-distribution
noise). Per sample, the optimised entries z (x_N and the noises, flattened, D of them) are cut
into n = D // k blocks of k entries; for z ~ N(0, I) the block mean m (k entries) has
n |m|^2 ~ chi2_k and the block covariance C = Z^T Z / n concentrates on I with spectral error
about sqrt(k / n). Two tail log-probabilities, each capped at -log 2,

    log p_m = -n |m|^2 / (2k),     log p_C = -n (max(0, sqrt(1 + |C - I|_2) - 1 - sqrt(k/n)))^2 / 2,

give reg(z) = -(log p_m + log p_C), evaluated on z in its own order and averaged over `perms`
random permutations (drawn from the estimator's rng), the two parts added. With reg = 0 the
gradient is the exact gradient of the chain."""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, require_graph
from estimators.randomness import torch_generator
from estimators.masked_chain import run_masked_chain


def _tail_terms(z: Tensor, block: int) -> Tensor:
    """-(log p_m + log p_C) per row of z (B, n * block)."""
    batch, dim = z.shape
    n = dim // block
    blocks = z.reshape(batch, n, block)
    mean = blocks.mean(1)
    cov = blocks.transpose(1, 2) @ blocks / n
    log_p_mean = (-n * mean.pow(2).sum(-1) / (2 * block)).clamp(max=-math.log(2))
    eye = torch.eye(block, dtype=z.dtype, device=z.device)
    spectral = torch.linalg.matrix_norm(cov - eye, ord=2)
    excess = ((1 + spectral).sqrt() - 1 - math.sqrt(block / n)).clamp(min=0)
    log_p_cov = (-n * excess.pow(2) / 2).clamp(max=-math.log(2))
    return -(log_p_mean + log_p_cov)


def probability_regulariser(z: Tensor, block: int, perms: int, generator: torch.Generator) -> Tensor:
    """Batch mean of DNO's regulariser of z (B, D): own order plus the mean over permutations."""
    dim = z.shape[1]
    used = (dim // block) * block
    value = _tail_terms(z[:, :used], block)
    if perms:
        shuffled = [
            _tail_terms(z[:, torch.randperm(dim, generator=generator)[:used].to(z.device)], block) for _ in range(perms)
        ]
        value = value + torch.stack(shuffled).mean(0)
    return value.mean()


class DNO(Estimator):
    name = "dno"
    plot_style = ("#8c564b", "h")  # colour and marker in every figure
    summary = "checkpointed backprop to x_N and the injected noises, optional probability regulariser (DNO)"
    options = (
        Option(
            "reg",
            float,
            0.0,
            "weight gamma of the probability regulariser (0: none; exact gradient)",
            check=at_least(0.0),
        ),
        Option("block", int, 4, "block size k of the regulariser's statistics (DNO: 4^subsample)", check=at_least(1)),
        Option("perms", int, 8, "random permutations averaged in the regulariser (DNO: 100)", check=at_least(0)),
        Option("checkpoint", bool, True, "recompute each step in backward (false: keep the whole graph)"),
    )
    variants = ("reg=0.1", "reg=0.1,block=2,perms=0", "checkpoint=false")

    def skip_reason(self, problem: Problem) -> str | None:
        if problem.target not in ("latent", "noise"):
            return "dno optimises the initial latent and the injected noises (targets latent, noise)"
        if self.reg > 0:
            dim = sum(leaf[0].numel() for leaf in problem.leaves)
            if dim < 2 * self.block:
                return f"the regulariser needs at least 2 blocks of {self.block} entries per sample (has {dim})"
        return None

    def cost(self, steps: int, target: str) -> Cost:
        if self.checkpoint:
            return Cost(
                nfe_forward=2 * steps,
                nfe_vjp=steps,
                memory="A + N·S",
                activations=1,
                latents=steps,
                checkpointed_forwards=2 * steps,
                activations_at_reward=0,
            )
        return Cost(nfe_forward=steps, nfe_vjp=steps, memory="N·A", activations=steps)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        x0 = run_masked_chain(problem, keep_graph=lambda i: True, keep_latent_path=True, checkpoint=self.checkpoint)
        loss, rewards = problem.loss(x0)
        require_graph(loss)
        total = loss
        if self.reg > 0:
            z = torch.cat([leaf.flatten(1) for leaf in problem.leaves], dim=1)
            total = loss + self.reg * probability_regulariser(z, self.block, self.perms, torch_generator(rng))
        total.backward()
        return Estimate(loss=float(loss.detach()), rewards=rewards.detach(), x0=x0.detach())
