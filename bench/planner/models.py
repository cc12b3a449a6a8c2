"""The architectures the planner knows: for each, the denoiser's diffusers class and config, the
VAE's config, the latent layout, the text conditioning the denoiser reads, and how guidance
reaches it. Only configs: no weights are read or needed. A user's model folder (a diffusers
pipeline folder, or a folder holding a denoiser's config.json) is read the same way, config files
only.

The configs below are the published ones of each model's diffusers folder (the denoiser's and the
VAE's config.json), written here so that planning needs no download."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.errors import SpecError

SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "in_channels": 3,
    "out_channels": 3,
}
FLOW_VAE = {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}

SD15_UNET = {"cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64}
SD21_UNET = {
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "sample_size": 96,
}
SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "sample_size": 128,
}
SD35_MEDIUM = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
SD35_LARGE = {
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
FLUX = {
    "attention_head_dim": 128,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


@dataclass(frozen=True)
class Architecture:
    """What the planner builds: `family` decides the denoiser's inputs (unet: SD 1.x/2.x, unet-xl:
    SDXL's added text and time embeddings, sd3: joint attention over T5+CLIP tokens and a pooled
    vector, flux: packed 2x2 latents with position ids)."""

    name: str
    family: str  # unet, unet-xl, sd3, flux
    denoiser_class: str
    denoiser: dict[str, Any]
    vae: dict[str, Any]
    text_tokens: int  # tokens of the conditioning the denoiser attends to
    guidance: str  # "cfg": classifier-free guidance doubles the denoiser's batch; "distilled": an input
    default_resolution: int
    default_steps: int
    prediction: str = "epsilon"  # epsilon, v_prediction, flow
    vae_scale: int = 8  # pixels per latent pixel
    note: str = ""
    denoiser_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    def check_resolution(self, resolution: int) -> None:
        """Refuse a resolution the VAE's downsampling or the transformer's patches cannot take."""
        multiple = self.vae_scale * (2 if self.family in ("sd3", "flux") else 1)
        if self.family in ("unet", "unet-xl"):
            levels = len(self.denoiser.get("block_out_channels", [320, 640, 1280, 1280]))
            multiple = self.vae_scale * 2 ** (levels - 1)
        if resolution <= 0 or resolution % multiple:
            raise SpecError(
                f"--resolution {resolution}: {self.name} needs a positive multiple of {multiple} "
                f"(the VAE's factor {self.vae_scale} times the denoiser's {multiple // self.vae_scale})"
            )
        if self.family == "sd3":
            patches = resolution // self.vae_scale // int(self.denoiser.get("patch_size", 2))
            if patches > int(self.denoiser.get("pos_embed_max_size", 96)):
                largest = int(self.denoiser["pos_embed_max_size"]) * self.vae_scale * 2
                raise SpecError(f"--resolution {resolution}: {self.name}'s position embedding reaches {largest} px")


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("sd1.5", "unet", "UNet2DConditionModel", SD15_UNET, SD_VAE, 77, "cfg", 512, 50),
        Architecture(
            "sd2.1", "unet", "UNet2DConditionModel", SD21_UNET, SD_VAE, 77, "cfg", 768, 50, prediction="v_prediction"
        ),
        Architecture("sdxl", "unet-xl", "UNet2DConditionModel", SDXL_UNET, SD_VAE, 77, "cfg", 1024, 50),
        Architecture(
            "sd3.5-medium",
            "sd3",
            "SD3Transformer2DModel",
            SD35_MEDIUM,
            FLOW_VAE,
            333,
            "cfg",
            512,
            40,
            prediction="flow",
        ),
        Architecture(
            "sd3.5-large", "sd3", "SD3Transformer2DModel", SD35_LARGE, FLOW_VAE, 333, "cfg", 1024, 40, prediction="flow"
        ),
        Architecture(
            "flux.1-dev",
            "flux",
            "FluxTransformer2DModel",
            {**FLUX, "guidance_embeds": True},
            FLOW_VAE,
            512,
            "distilled",
            1024,
            28,
            prediction="flow",
        ),
        Architecture(
            "flux.1-schnell",
            "flux",
            "FluxTransformer2DModel",
            {**FLUX, "guidance_embeds": False},
            FLOW_VAE,
            256,
            "none",
            1024,
            4,
            prediction="flow",
        ),
    )
}

_FAMILY_OF_CLASS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"--model {path.parent}: {path.name} is not a readable JSON config ({exc})") from None


def from_folder(folder: Path) -> Architecture:
    """The architecture of a user's model folder: a diffusers pipeline folder (model_index.json with
    unet/ or transformer/ and vae/) or a denoiser folder (config.json alone); configs only."""
    denoiser_dir = next((folder / d for d in ("unet", "transformer") if (folder / d / "config.json").is_file()), None)
    if denoiser_dir is None and (folder / "config.json").is_file():
        denoiser_dir = folder
    if denoiser_dir is None:
        raise SpecError(
            f"--model {folder}: no config.json there or in unet/ or transformer/ "
            "(give a diffusers pipeline folder, a denoiser folder or a known name)"
        )
    config = _read_json(denoiser_dir / "config.json")
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls not in ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"):
        raise SpecError(
            f"--model {folder}: a {cls} denoiser is not planned yet "
            "(UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel are)"
        )
    family = _FAMILY_OF_CLASS.get(cls, "unet-xl" if config.get("addition_embed_type") == "text_time" else "unet")
    vae = _read_json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else None
    if vae is None:
        vae = FLOW_VAE if family in ("sd3", "flux") else SD_VAE
    vae = {k: v for k, v in vae.items() if not k.startswith("_")}
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction = "flow" if family in ("sd3", "flux") else "epsilon"
    if scheduler.is_file():
        prediction = _read_json(scheduler).get("prediction_type", prediction) if prediction != "flow" else prediction
    denoiser = {k: v for k, v in config.items() if not k.startswith("_")}
    vae_scale = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)
    tokens = {"unet": 77, "unet-xl": 77, "sd3": 333, "flux": 512}[family]
    if family == "flux":
        guidance = "distilled" if denoiser.get("guidance_embeds") else "none"
    else:
        guidance = "cfg"
    return Architecture(
        str(folder),
        family,
        cls,
        denoiser,
        vae,
        tokens,
        guidance,
        1024 if family != "unet" else 512,
        28,
        prediction=prediction,
        vae_scale=vae_scale,
    )


def architecture(name: str) -> Architecture:
    """A known architecture by name, or a local folder's."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return from_folder(path)
    close = difflib.get_close_matches(name.lower(), list(ARCHITECTURES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise SpecError(f"unknown --model {name!r}; {hint}give one of {', '.join(ARCHITECTURES)} or a model folder")


def scaled(arch: Architecture, **denoiser: Any) -> Architecture:
    """The same architecture with some denoiser config values replaced (tests: fewer layers)."""
    return replace(arch, denoiser={**arch.denoiser, **denoiser})
