"""Random draws inside estimators come from the `random.Random` the harness passes in, so that a
fixed seed fixes the gradient (the conformance suite checks it)."""

from __future__ import annotations

import random

import torch


def torch_generator(rng: random.Random) -> torch.Generator:
    """A CPU torch generator seeded from the estimator's rng."""
    return torch.Generator().manual_seed(rng.getrandbits(63))
