"""A folder of digits models with random weights, saved exactly as trained ones are: it exercises
the real loading code (from_pretrained, safetensors) without training anything."""

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from tasks.digits.classifier import DigitClassifier
from tasks.digits.model import NULL_CLASS, TOKENS, UNET_CONFIG, WIDTH


def write_random_models(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(folder / "unet")
    save_file({"table": torch.randn(NULL_CLASS + 1, TOKENS * WIDTH)}, folder / "embedding.safetensors")
    save_file({k: v.contiguous() for k, v in DigitClassifier().state_dict().items()}, folder / "classifier.safetensors")
    return folder
