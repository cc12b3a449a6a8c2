"""Where the digits models live: committed in tasks/digits/weights/ (trained by
`python -m tasks.digits.train --out tasks/digits/weights`), else the user's cache, where they are
trained on first use."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.cache import cache_root

COMMITTED = Path(__file__).resolve().parent / "weights"
FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "embedding.safetensors",
         "classifier.safetensors")


def cache_dir() -> Path:
    return cache_root() / "digits"


def complete(folder: Path) -> bool:
    return all((folder / name).exists() for name in FILES)


def locate() -> Path | None:
    for folder in (COMMITTED, cache_dir()):
        if complete(folder):
            return folder
    return None


def fingerprint(folder: Path) -> str:
    """sha256 over the model files (what a cell's key records, so retrained weights rerun cells)."""
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]
