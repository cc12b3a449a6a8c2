"""Where the digits models live: committed in tasks/digits/weights/ (trained by
`python -m tasks.digits.train --out tasks/digits/weights`), else the user's cache, where they are
trained on first use."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.cache import cache_root

COMMITTED = Path(__file__).resolve().parent / "weights"
FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "embedding.safetensors",
    "classifier.safetensors",
)
# The rectified-flow model (`digits[model=flow]`) in flow/, sharing the classifier.
FLOW_FILES = (
    "flow/unet/config.json",
    "flow/unet/diffusion_pytorch_model.safetensors",
    "flow/embedding.safetensors",
    "classifier.safetensors",
)


# The rectified-flow transformer (`digits[model=transformer]`) in transformer/, sharing the classifier.
TRANSFORMER_FILES = (
    "transformer/transformer/config.json",
    "transformer/transformer/diffusion_pytorch_model.safetensors",
    "transformer/embedding.safetensors",
    "classifier.safetensors",
)
MODELS = {"epsilon": FILES, "flow": FLOW_FILES, "transformer": TRANSFORMER_FILES}
AUDIT = "audit.safetensors"  # the held-out judge of the audit reward, read only where it is named


def files(model: str = "epsilon") -> tuple[str, ...]:
    return MODELS[model]


def model_dir(folder: Path, model: str = "epsilon") -> Path:
    """Where a model's network folder (unet/ or transformer/) and embedding.safetensors are."""
    return folder if model == "epsilon" else folder / model


def cache_dir() -> Path:
    return cache_root() / "digits"


def complete(folder: Path, model: str = "epsilon") -> bool:
    return all((folder / name).exists() for name in files(model))


def locate(model: str = "epsilon") -> Path | None:
    for folder in (COMMITTED, cache_dir()):
        if complete(folder, model):
            return folder
    return None


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fingerprint(folder: Path, model: str = "epsilon") -> str:
    """sha256 over the model files (what a cell's key records, so retrained weights rerun cells)."""
    digest = hashlib.sha256()
    for name in files(model):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    # the distilled students (tasks/digits/shortcut.py) ride on the epsilon model and the transformer
    students = {"epsilon": ("shortcut", "k*.safetensors"), "transformer": ("transformer/shortcut", "student.*")}
    if model in students:
        where, pattern = students[model]
        for path in sorted((folder / where).glob(pattern)):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
