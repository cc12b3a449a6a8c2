"""Two preference rewards of decoded images that ship with their own packages: HPSv2 and ImageReward.

Include this file and name either reward on an image task (sd and its kin), e.g.

    python -m bench run --include examples/preference_rewards.py --tasks 'sd[reward=hpsv2]' ...
    python -m bench run --include examples/preference_rewards.py --tasks 'sd[reward=imagereward]' ...

Both score each sample against its own prompt (sample b was drawn for prompt b mod n, as the task
cycles its prompts), differentiably in the image, on the task's device and in its network dtype
(`dtype=`); the float64 reference gets a float64 copy, as the built-in rewards do.

- `hpsv2` (Wu et al. 2023, "Human Preference Score v2"): package `hpsv2` (pip install hpsv2), an
  open_clip ViT-H-14 whose weights are the HPS checkpoint. The score is the cosine of the
  normalised image and prompt features, the diagonal of image_features @ text_features.T that
  hpsv2's own scoring takes (no logit scale: values near 0.2-0.3). The image is preprocessed as
  hpsv2 does for scoring: the longer side resized to the model's 224, zero-padded to a square,
  CLIP's normalisation.
- `imagereward` (Xu et al. 2023, "ImageReward"): package `image-reward` (module `ImageReward`),
  a BLIP ViT-L image encoder, the BLIP text encoder cross-attending to it, and an MLP head on its
  CLS token, normalised by the package's own mean and std, (r - mean) / std: the differentiable
  score ImageReward's ReFL fine-tuning backpropagates through. The image is resized (shorter side)
  to 224, centre-cropped and CLIP-normalised; prompts are tokenised to 35 tokens as the package does.

The weights are local files named by environment variables (a plug-in cannot add options to a
task); nothing is ever downloaded:

    DIFFGRAD_HPSV2_CHECKPOINT          HPS_v2_compressed.pt (or HPS_v2.1_compressed.pt)
    DIFFGRAD_IMAGEREWARD_CHECKPOINT    ImageReward.pt
    DIFFGRAD_IMAGEREWARD_MED_CONFIG    BLIP's med_config.json (default: the one beside the checkpoint)
    DIFFGRAD_IMAGEREWARD_TOKENIZER     a folder with bert-base-uncased's vocab.txt (default: that
                                       model in the local Hugging Face cache)

ImageReward's BLIP builds its tokenizer with BertTokenizer.from_pretrained("bert-base-uncased"),
which would fetch it from the hub; this file points that call at the local folder while the model
is built. Missing packages, variables or files are refused in one line before anything runs (the
reward's check). The variables are not part of the cells' keys: rerun with a fresh --out (or
--force) after pointing a variable at another checkpoint. See docs/rewards.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.errors import SpecError
from bench.rewards import REWARDS, first_line
from tasks.sd.rewards import CLIP_MEAN, CLIP_STD, IMAGE, NetworkReward

HPSV2_CHECKPOINT = "DIFFGRAD_HPSV2_CHECKPOINT"
IMAGEREWARD_CHECKPOINT = "DIFFGRAD_IMAGEREWARD_CHECKPOINT"
IMAGEREWARD_MED_CONFIG = "DIFFGRAD_IMAGEREWARD_MED_CONFIG"
IMAGEREWARD_TOKENIZER = "DIFFGRAD_IMAGEREWARD_TOKENIZER"

HPSV2_ARCHITECTURE = "ViT-H-14"  # the open_clip model the HPS checkpoints fine-tune
IMAGEREWARD_SIZE = 224  # BLIP's input size in ImageReward
IMAGEREWARD_TOKENS = 35  # the prompt length ImageReward tokenises to
BERT = ("bert-base-uncased", "google-bert/bert-base-uncased")  # BLIP's tokenizer, by its hub ids


# --- what both need ------------------------------------------------------------------------------
def _owner(task, reward: str) -> str:
    return f"{getattr(task, 'name', 'sd')}[reward={reward}]"


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    if module in sys.modules:  # imported already (None there: blocked)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _import(task, reward: str, module: str, pip: str):
    """`module`, imported; a missing package or a failing import is a one-line SpecError."""
    top = module.partition(".")[0]
    if not _installed(top):
        raise SpecError(f"{_owner(task, reward)}: the {pip} package is not installed (module {top}); pip install {pip}")
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise SpecError(f"{_owner(task, reward)}: {module} (pip {pip}) fails to import: {first_line(exc)}") from None


def _file(task, reward: str, variable: str, what: str) -> Path:
    """The file the environment variable names, checked."""
    value = os.environ.get(variable, "").strip()
    if not value:
        raise SpecError(f"{_owner(task, reward)}: set {variable} to the path of {what}; nothing is downloaded")
    path = Path(value).expanduser()
    if not path.is_file():
        raise SpecError(f"{_owner(task, reward)}: {variable}={value!r} is not a file; point it at {what}")
    return path


def _state_dict(task, reward: str, path: Path) -> dict[str, Tensor]:
    """A checkpoint's tensors (its "state_dict" entry if it has one, "module." prefixes dropped),
    read with weights_only: a checkpoint is data, not code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecError(f"{_owner(task, reward)}: cannot read {path} as a state dict ({first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise SpecError(f"{_owner(task, reward)}: {path} holds no state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _normalise(images: Tensor, mean, std) -> Tensor:
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    # antialiased bicubic, as PIL resizes the images the packages score (and torchvision tensors now)
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def longer_side_padded(images: Tensor, size: int) -> Tensor:
    """open_clip's resize_longest_max preprocessing, which hpsv2 scores with: the longer side to
    `size`, then zero (black) padding, split evenly, to a size x size square."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new = (round(height * scale), round(width * scale))
    resized = _resize(images, new)
    pad_h, pad_w = size - new[0], size - new[1]
    return F.pad(resized, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def shorter_side_cropped(images: Tensor, size: int) -> Tensor:
    """Resize(size) then CenterCrop(size), as ImageReward preprocesses: the shorter side to `size`,
    the middle size x size square kept."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new = (max(size, int(height * scale)), max(size, int(width * scale)))
    resized = _resize(images, new)
    top, left = round((new[0] - size) / 2), round((new[1] - size) / 2)
    return resized[..., top : top + size, left : left + size]


def _own_prompts(count: int, batch: int, device: torch.device) -> Tensor:
    """The prompt index of each sample: sample b was drawn for prompt b mod n."""
    return torch.arange(batch, device=device) % count


# --- HPSv2 ---------------------------------------------------------------------------------------
class HPSv2Score(NetworkReward):
    """cos(image features, own prompt's features) under the HPS-tuned open_clip ViT-H-14."""

    parts = ("model",)

    def __init__(self, model: torch.nn.Module, text: Tensor, size: int, mean, std, dtype: torch.dtype) -> None:
        self.model = model
        self.text = text  # (n, D) normalised prompt features, float64
        self.size, self.mean, self.std, self.dtype = size, mean, std, dtype

    def __call__(self, images: Tensor) -> Tensor:
        pixels = _normalise(longer_side_padded(images, self.size), self.mean, self.std).to(self.dtype)
        features = F.normalize(self.model.encode_image(pixels).to(images.dtype), dim=-1)
        order = _own_prompts(self.text.shape[0], features.shape[0], features.device)
        return (features * self.text[order].to(features)).sum(-1)


def _hpsv2_modules(task):
    """hpsv2's own copy of open_clip (what its scoring builds the model with)."""
    return _import(task, "hpsv2", "hpsv2.src.open_clip", "hpsv2")


def check_hpsv2(task) -> None:
    _hpsv2_modules(task)
    _file(task, "hpsv2", HPSV2_CHECKPOINT, "the HPSv2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)")


def hpsv2(task) -> HPSv2Score:
    open_clip = _hpsv2_modules(task)
    path = _file(task, "hpsv2", HPSV2_CHECKPOINT, "the HPSv2 checkpoint")
    # No pretrained tag: open_clip would fetch the LAION weights; the HPS checkpoint replaces them all.
    model, _, _ = open_clip.create_model_and_transforms(
        HPSV2_ARCHITECTURE, pretrained=None, precision="fp32", device="cpu"
    )
    try:
        model.load_state_dict(_state_dict(task, "hpsv2", path))
    except RuntimeError as exc:
        raise SpecError(
            f"{_owner(task, 'hpsv2')}: {path} does not fit open_clip {HPSV2_ARCHITECTURE} ({first_line(exc)})"
        ) from None
    model = model.to(device=task.device, dtype=task.network_dtype).eval().requires_grad_(False)
    tokens = open_clip.get_tokenizer(HPSV2_ARCHITECTURE)(list(task.prompt_list)).to(task.device)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens).double(), dim=-1)
    size = model.visual.image_size
    size = int(size if isinstance(size, int) else max(size))
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD
    return HPSv2Score(model, text, size, tuple(mean), tuple(std), task.network_dtype)


# --- ImageReward ---------------------------------------------------------------------------------
class ImageRewardScore(NetworkReward):
    """ImageReward's score, (mlp(BLIP text encoder's CLS | image) - mean) / std, differentiable."""

    parts = ("model",)

    def __init__(self, model: torch.nn.Module, ids: Tensor, mask: Tensor, dtype: torch.dtype) -> None:
        self.model = model
        self.ids, self.mask = ids, mask  # (n, 35): each prompt's tokens and attention mask
        self.mean, self.std = float(model.mean), float(model.std)
        self.dtype = dtype

    def __call__(self, images: Tensor) -> Tensor:
        pixels = _normalise(shorter_side_cropped(images, IMAGEREWARD_SIZE), CLIP_MEAN, CLIP_STD).to(self.dtype)
        blip = self.model.blip
        image_embeds = blip.visual_encoder(pixels)
        order = _own_prompts(self.ids.shape[0], pixels.shape[0], pixels.device)
        out = blip.text_encoder(
            self.ids[order],
            attention_mask=self.mask[order],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device),
            return_dict=True,
        )
        raw = self.model.mlp(out.last_hidden_state[:, 0, :]).squeeze(-1)
        return ((raw - self.mean) / self.std).to(images.dtype)


def _bert_folder(task) -> Path:
    """A local folder with BLIP's tokenizer (bert-base-uncased's vocab.txt)."""
    value = os.environ.get(IMAGEREWARD_TOKENIZER, "").strip()
    if value:
        folder = Path(value).expanduser()
        if not (folder / "vocab.txt").is_file():
            raise SpecError(
                f"{_owner(task, 'imagereward')}: {IMAGEREWARD_TOKENIZER}={value!r} holds no vocab.txt; "
                "point it at a bert-base-uncased tokenizer folder"
            )
        return folder
    from huggingface_hub import try_to_load_from_cache

    for repo in BERT:
        found = try_to_load_from_cache(repo, "vocab.txt")
        if isinstance(found, str):
            return Path(found).parent
    raise SpecError(
        f"{_owner(task, 'imagereward')}: BLIP's tokenizer (bert-base-uncased) is not in the local Hugging Face "
        f"cache; set {IMAGEREWARD_TOKENIZER} to a folder holding its vocab.txt (nothing is downloaded)"
    )


def _imagereward_files(task) -> tuple[Path, Path, Path]:
    """(checkpoint, med_config.json, tokenizer folder), checked."""
    checkpoint = _file(task, "imagereward", IMAGEREWARD_CHECKPOINT, "the ImageReward checkpoint (ImageReward.pt)")
    if os.environ.get(IMAGEREWARD_MED_CONFIG, "").strip():
        med_config = _file(task, "imagereward", IMAGEREWARD_MED_CONFIG, "BLIP's med_config.json")
    else:
        med_config = checkpoint.parent / "med_config.json"
        if not med_config.is_file():
            raise SpecError(
                f"{_owner(task, 'imagereward')}: no med_config.json beside {checkpoint}; put ImageReward's "
                f"med_config.json there or set {IMAGEREWARD_MED_CONFIG} to it"
            )
    return checkpoint, med_config, _bert_folder(task)


def _imagereward_module(task):
    return _import(task, "imagereward", "ImageReward.ImageReward", "image-reward")


def check_imagereward(task) -> None:
    _imagereward_module(task)
    _imagereward_files(task)


@contextlib.contextmanager
def bert_tokenizer_from(folder: Path):
    """While the block runs, BertTokenizer.from_pretrained(any name) loads the tokenizer in `folder`,
    local files only: BLIP asks for "bert-base-uncased" by hub id while it is built."""
    from unittest import mock

    from transformers import BertTokenizer

    load = BertTokenizer.from_pretrained  # bound to the class

    def local(cls, name, *args, **kwargs):
        return load(str(folder), *args, **{**kwargs, "local_files_only": True})

    with mock.patch.object(BertTokenizer, "from_pretrained", classmethod(local)):
        yield


def imagereward(task) -> ImageRewardScore:
    module = _imagereward_module(task)
    checkpoint, med_config, tokenizer = _imagereward_files(task)
    with bert_tokenizer_from(tokenizer):
        model = module.ImageReward(med_config=str(med_config), device=task.device)
    state = _state_dict(task, "imagereward", checkpoint)
    missing = model.load_state_dict(state, strict=False).missing_keys  # strict=False, as the package loads it
    if not any(key.startswith("blip.") for key in state) or any(key.startswith("mlp.") for key in missing):
        raise SpecError(
            f"{_owner(task, 'imagereward')}: {checkpoint} is not an ImageReward checkpoint (no blip.* / mlp.*)"
        )
    model = model.to(device=task.device, dtype=task.network_dtype).eval().requires_grad_(False)
    tokens = model.blip.tokenizer(
        list(task.prompt_list),
        padding="max_length",
        truncation=True,
        max_length=IMAGEREWARD_TOKENS,
        return_tensors="pt",
    )
    return ImageRewardScore(
        model, tokens.input_ids.to(task.device), tokens.attention_mask.to(task.device), task.network_dtype
    )


REWARDS.register(
    "hpsv2",
    domain=IMAGE,
    description="HPSv2 (Wu et al. 2023): cosine of the image and its own prompt under the HPS-tuned open_clip "
    "ViT-H-14 (pip hpsv2; DIFFGRAD_HPSV2_CHECKPOINT=FILE)",
    factory=hpsv2,
    check=check_hpsv2,
)
REWARDS.register(
    "imagereward",
    domain=IMAGE,
    description="ImageReward (Xu et al. 2023): BLIP image-text encoder and MLP head, (r - mean) / std, against "
    "the image's own prompt (pip image-reward; DIFFGRAD_IMAGEREWARD_CHECKPOINT=FILE)",
    factory=imagereward,
    check=check_imagereward,
)
