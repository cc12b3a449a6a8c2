"""scikit-learn's 8x8 digits (1797 images, shipped inside the package), scaled to [-1, 1] and
split once, with a fixed seed, into training and held-out sets."""

from __future__ import annotations

import functools

import torch

HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 0
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # (n, 1, 8, 8)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    return images, labels


def split(part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """('train' | 'held_out') -> (images in [-1, 1] of shape (n, 1, 8, 8), labels)."""
    images, labels = _load()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = int(len(images) * (1 - HELD_OUT_FRACTION))
    index = order[:cut] if part == "train" else order[cut:]
    if part not in ("train", "held_out"):
        raise ValueError(f"unknown split {part!r}; valid: train, held_out")
    return images[index], labels[index]
