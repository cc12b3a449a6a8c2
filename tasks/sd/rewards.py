"""Rewards of decoded images (B, 3, H, W) in [0, 1] -> (B,), by name: `sd[reward=NAME]`.

- `clip`: CLIP similarity between the image and `reward_text` (cosine of the projected
  embeddings, x 100 as CLIPScore; Radford et al. 2021; used by DOODL and AdjointDPM), from a local
  `transformers` CLIPModel folder (`clip_model=PATH`; `tiny` builds a random one: meaningless).
  Computed directly: torchmetrics' CLIPScore takes hub names only.
- `jpeg` / `jpeg-incompressibility`: minus / plus the JPEG size in kB at quality 95 (DDPO, Black
  et al. 2023): not differentiable; backprop estimators skip it, score-function and zeroth-order run.
- `aesthetic`: the LAION aesthetic predictor (Schuhmann et al., "improved-aesthetic-predictor",
  as DDPO and DRaFT use it): an MLP head (`aesthetic_head=PATH`, a state dict with `layers.*` keys,
  e.g. sac+logos+ava1-l14-linearMSE.pth) on the normalised CLIP image embedding (`clip_model`,
  ViT-L/14 for the real head).
- `lpips`: minus the LPIPS distance to `reference_image` (Zhang et al. 2018; a perceptual target as
  in DOODL's and AdjointDPM's guidance), the `lpips` package's linear heads on an AlexNet whose
  torchvision state dict is a local file (`lpips_backbone=PATH`, e.g. alexnet-owt-7be5be79.pth:
  the package would download it otherwise).
- `module:function` (or `path/to/file.py:function`): your own, called as function(images) -> (B,)
  tensor; PickScore, HPSv2 or ImageReward plug in this way. An installed package can also name one
  in the entry-point group `diffgrad_bench.rewards` (name = "module:function"), used as reward=name.

They are registered here, in bench/rewards.py's registry, for the domain "image" (IMAGE): any task
whose samples are decoded images serves them, and sd serves every reward of that domain.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch
from torch import Tensor

from bench.errors import SpecError
from bench.rewards import REWARDS, first_line
from tasks.cache import cache_root
from tasks.sd import tiny

IMAGE = REWARDS.domain("image", "images", "(B, 3, H, W) images in [0, 1]")
# what `python -m bench list` showed of sd's rewards (kept until it reads the registry)
DESCRIPTIONS = {
    "clip": "100 x cosine of CLIP image and reward_text embeddings (Radford et al. 2021), clip_model=PATH",
    "pickscore": "PickScore: exp(logit scale) x cosine of the image and its own prompt under a preference-tuned "
    "CLIP (Kirstain et al. 2023), clip_model=PATH to the PickScore CLIPModel folder",
    "aesthetic": "LAION aesthetic MLP on the CLIP image embedding (DDPO, DRaFT), aesthetic_head=PATH",
    "lpips": "minus LPIPS to reference_image (Zhang et al. 2018), AlexNet from lpips_backbone=PATH",
    "jpeg": "minus the JPEG size in kB, quality 95 (DDPO); not differentiable",
    "jpeg-incompressibility": "the JPEG size in kB (DDPO); not differentiable",
    "module:function": "your own: function(images in [0, 1], (B, 3, H, W)) -> (B,) rewards",
}
__all__ = ["first_line"]  # used by the task's messages
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


class NetworkReward:
    """A reward or feature built on networks: `to(dtype)` gives a copy whose networks (`parts`:
    modules, or other NetworkRewards) run in dtype, for the float64 reference."""

    parts: tuple[str, ...] = ()
    dtype: torch.dtype

    def to(self, dtype: torch.dtype):
        other = copy.copy(self)
        for name in self.parts:
            part = getattr(self, name)
            setattr(other, name, copy.deepcopy(part).to(dtype) if isinstance(part, torch.nn.Module) else part.to(dtype))
        other.dtype = dtype
        return other


class ClipImageEmbedding(NetworkReward):
    """The normalised CLIP image embedding of images in [0, 1], differentiable (resize, CLIP's
    normalisation, the vision tower and its projection), from a local CLIPModel folder."""

    parts = ("model",)

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import CLIPModel

        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device=device, dtype=dtype)
        self.model.eval().requires_grad_(False)
        self.size = self.model.config.vision_config.image_size
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        self.dtype = dtype

    def embed(self, images: Tensor) -> Tensor:
        pixels = torch.nn.functional.interpolate(
            images, size=(self.size, self.size), mode="bicubic", align_corners=False
        )
        pixels = ((pixels - self.mean.to(pixels)) / self.std.to(pixels)).to(self.dtype)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.to(images.dtype), dim=-1)


class AestheticScore(NetworkReward):
    """LAION's aesthetic MLP on the normalised CLIP image embedding."""

    parts = ("clip", "head")

    def __init__(self, clip: ClipImageEmbedding, head_file: Path) -> None:
        state = torch.load(head_file, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        linears = sorted({k.split(".")[1] for k in state if k.startswith("layers.") and k.endswith(".weight")}, key=int)
        if not linears:
            raise SpecError(f"sd[aesthetic_head={head_file}]: no layers.*.weight in the state dict")
        layers: list[torch.nn.Module] = []
        for index in range(int(linears[-1]) + 1):
            weight = state.get(f"layers.{index}.weight")
            layers.append(
                torch.nn.Linear(weight.shape[1], weight.shape[0]) if weight is not None else torch.nn.Dropout(0.0)
            )
        self.head = torch.nn.Sequential(*layers)
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        # The head runs in float32 (float64 for a float64 CLIP: the reference), beside CLIP's device.
        head_dtype = torch.float64 if clip.dtype == torch.float64 else torch.float32
        self.head.to(device=clip.model.device, dtype=head_dtype).eval().requires_grad_(False)
        self.clip = clip

    def __call__(self, images: Tensor) -> Tensor:
        embedding = self.clip.embed(images)
        score = self.head(embedding.to(next(self.head.parameters()).dtype)).squeeze(-1)
        return score.to(embedding.dtype)


def write_tiny_aesthetic_head(path: Path, width: int, seed: int = 0) -> Path:
    """An aesthetic head of LAION's layout (Linear/Dropout stack under `layers`) on a `width`-d
    embedding, random: for the loading path in tests and the tiny demo."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Sequential(
            torch.nn.Linear(width, 32),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(32, 16),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(16, 1),
        )
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    return path


class ClipSimilarity(NetworkReward):
    """100 * cos(image embedding, text embedding) with a local CLIPModel, differentiable in the image."""

    parts = ("clip",)

    def __init__(self, clip: ClipImageEmbedding, folder: Path, text: str) -> None:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        tokens = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).to(clip.model.device)
        with torch.no_grad():
            text_embeds = clip.model.get_text_features(**tokens)
            text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        self.text = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
        self.clip = clip

    def __call__(self, images: Tensor) -> Tensor:
        image = self.clip.embed(images)
        return 100 * (image * self.text.to(image)).sum(-1)


class PickScore(NetworkReward):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP model fine-tuned on human preferences,
    scored as CLIP scores an image against its caption, exp(logit_scale) * cos(image embedding,
    prompt embedding), with the model's learned logit scale, each sample against its own prompt
    (sample b was drawn for prompt b mod n, as the task cycles them)."""

    parts = ("clip",)

    def __init__(self, clip: ClipImageEmbedding, folder: Path, prompts: list[str]) -> None:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).to(clip.model.device)
        with torch.no_grad():
            text_embeds = clip.model.get_text_features(**tokens)
            text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
            self.scale = float(clip.model.logit_scale.exp())
        self.text = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
        self.clip = clip

    def __call__(self, images: Tensor) -> Tensor:
        image = self.clip.embed(images)
        order = torch.arange(image.shape[0], device=image.device) % self.text.shape[0]
        return self.scale * (image * self.text[order].to(image)).sum(-1)


class LpipsDistance(NetworkReward):
    """-LPIPS(image, reference): AlexNet features (from a local torchvision state dict) with the
    lpips package's own linear heads (shipped inside the package)."""

    parts = ("model",)

    def __init__(self, backbone_file: Path, reference_file: Path, device: torch.device, dtype: torch.dtype) -> None:
        import warnings

        import lpips
        import torchvision
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained` argument inside lpips
            model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        alexnet = torchvision.models.alexnet()
        alexnet.load_state_dict(torch.load(backbone_file, map_location="cpu", weights_only=True))
        for part in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
            for index, module in part.named_children():
                module.load_state_dict(alexnet.features[int(index)].state_dict())
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        import numpy as np

        pixels = np.asarray(Image.open(reference_file).convert("RGB"), dtype=np.float64) / 255
        self.reference = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)
        self.dtype = dtype

    def __call__(self, images: Tensor) -> Tensor:
        reference = torch.nn.functional.interpolate(
            self.reference.to(images), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        distance = self.model(images.to(self.dtype), reference.expand_as(images).to(self.dtype), normalize=True)
        return -distance.flatten().to(images.dtype)


def write_random_alexnet(path: Path, seed: int = 0) -> Path:
    """A torchvision AlexNet state dict with random weights: the lpips reward's loading path in
    tests (its distances mean nothing)."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def local_folder(value: str, what: str) -> Path:
    """A local folder for option `what`: a path, or a model id in the local Hugging Face cache."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SpecError(f"sd[{what}={value}]: not a folder")
        return path
    if "/" in value and not value.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(value, local_files_only=True))
        except Exception:
            pass
    raise SpecError(
        f"sd[{what}={value}]: no such folder, and not a model id in the local Hugging Face "
        "cache (nothing is downloaded); give a pipeline folder or tiny"
    )


def clip_folder(task) -> Path | None:
    """The task's clip_model folder, checked; None for tiny (a random CLIP built on first use)."""
    if task.clip_model == "tiny":
        return None
    folder = local_folder(task.clip_model, "clip_model")
    if not (folder / "config.json").exists():
        raise SpecError(f"sd[clip_model={task.clip_model}]: no CLIPModel there (config.json missing)")
    return folder


def head_file(task) -> Path | None:
    """The task's aesthetic_head file, checked; None for tiny (a random head)."""
    if task.aesthetic_head == "tiny":
        return None
    head = Path(task.aesthetic_head).expanduser()
    if not task.aesthetic_head or not head.is_file():
        raise SpecError(
            f"sd[reward=aesthetic]: the aesthetic head file {task.aesthetic_head!r} is missing; "
            "point aesthetic_head= at LAION's MLP state dict (e.g. sac+logos+ava1-l14-linearMSE.pth)"
        )
    if task.clip_model == "tiny":
        raise SpecError("sd[reward=aesthetic]: a real aesthetic head needs its CLIP (ViT-L/14): set clip_model=PATH")
    return head


def _check_aesthetic(task) -> None:
    clip_folder(task)
    head_file(task)


def _check_lpips(task) -> None:
    for option in ("lpips_backbone", "reference_image"):
        value = task.values[option]
        if not value or not Path(value).expanduser().is_file():
            raise SpecError(
                f"sd[reward=lpips]: {option}={value!r} is not a file; give the path "
                + (
                    "of a torchvision AlexNet state dict (alexnet-owt-7be5be79.pth)"
                    if option == "lpips_backbone"
                    else "of the target image"
                )
            )


def _clip(task) -> tuple[ClipImageEmbedding, Path]:
    folder = clip_folder(task) or cache_root() / "clip-tiny"
    if task.clip_model == "tiny" and not (folder / "config.json").exists():
        tiny.build_clip(folder)
    return ClipImageEmbedding(folder, task.device, task.network_dtype), folder


def _clip_similarity(task) -> ClipSimilarity:
    clip, folder = _clip(task)
    return ClipSimilarity(clip, folder, task.reward_text)


def _pickscore(task) -> PickScore:
    clip, folder = _clip(task)
    return PickScore(clip, folder, task.prompt_list)


def _aesthetic(task) -> AestheticScore:
    clip, _ = _clip(task)
    head = head_file(task)
    if head is None:  # the tiny demo: a random head of LAION's layout on tiny CLIP's width
        head = cache_root() / "aesthetic-tiny.pth"
        if not head.exists():
            write_tiny_aesthetic_head(head, clip.model.config.projection_dim)
    return AestheticScore(clip, head)


def _lpips(task) -> LpipsDistance:
    return LpipsDistance(
        Path(task.lpips_backbone).expanduser(), Path(task.reference_image).expanduser(), task.device, task.network_dtype
    )


def _jpeg(task):
    return lambda images: -jpeg_kilobytes(images)


def _jpeg_incompressibility(task):
    return jpeg_kilobytes


for _name, _factory, _check in (
    ("clip", _clip_similarity, clip_folder),
    ("aesthetic", _aesthetic, _check_aesthetic),
    ("lpips", _lpips, _check_lpips),
    ("jpeg", _jpeg, None),
    ("jpeg-incompressibility", _jpeg_incompressibility, None),
    ("pickscore", _pickscore, clip_folder),
):
    REWARDS.register(_name, domain=IMAGE, description=DESCRIPTIONS[_name], factory=_factory, check=_check)
