"""Rewards of decoded images (B, 3, H, W) in [0, 1] -> (B,), by name: `sd[reward=NAME]`.

- `clip`: CLIP similarity between the image and `reward_text` (cosine of the projected
  embeddings, x 100 as CLIPScore; Radford et al. 2021; used by DOODL and AdjointDPM), from a local
  `transformers` CLIPModel folder (`clip_model=PATH`; `tiny` builds a random one: meaningless).
  Computed directly: torchmetrics' CLIPScore takes hub names only.
- `jpeg` / `jpeg-incompressibility`: minus / plus the JPEG size in kB at quality 95 (DDPO, Black
  et al. 2023): not differentiable; backprop estimators skip it, score-function and zeroth-order run.
- `module:function` (or `path/to/file.py:function`): your own, called as function(images) -> (B,)
  tensor; PickScore, HPSv2 or ImageReward plug in this way.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from bench.errors import SpecError

BUILT_IN = ("clip", "jpeg", "jpeg-incompressibility")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def jpeg_kilobytes(images: Tensor, quality: int = 95) -> Tensor:
    from PIL import Image

    sizes = []
    for image in images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu():
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=images.dtype, device=images.device)


class ClipSimilarity:
    """100 * cos(image embedding, text embedding) with a local CLIPModel, differentiable in the image."""

    def __init__(self, folder: Path, text: str, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device=device, dtype=dtype)
        self.model.eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        tokens = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").to(device)
        with torch.no_grad():
            text_embeds = self.model.get_text_features(**tokens)
            text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        self.text = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
        self.size = self.model.config.vision_config.image_size
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        self.dtype = dtype

    def __call__(self, images: Tensor) -> Tensor:
        pixels = torch.nn.functional.interpolate(images, size=(self.size, self.size), mode="bicubic",
                                                 align_corners=False)
        pixels = ((pixels - self.mean.to(pixels)) / self.std.to(pixels)).to(self.dtype)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        image = torch.nn.functional.normalize(features.to(images.dtype), dim=-1)
        return 100 * (image * self.text.to(image)).sum(-1)


def user_reward(spec: str) -> Callable[[Tensor], Tensor]:
    """'package.module:function' or 'path/to/file.py:function'."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            file = Path(target).expanduser()
            if not file.is_file():
                raise SpecError(f"reward={spec}: no such file {file}")
            module_spec = importlib.util.spec_from_file_location(f"_bench_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        function = getattr(module, attr)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"reward={spec}: cannot load it ({type(exc).__name__}: {exc}); "
                        "expected module:function or file.py:function") from None
    if not callable(function):
        raise SpecError(f"reward={spec}: {attr} is not callable")
    return function


def check_name(value: str) -> str | None:
    if value in BUILT_IN or (":" in value and value.rpartition(":")[2]):
        return None
    return f"must be one of {', '.join(BUILT_IN)}, or module:function / file.py:function"
