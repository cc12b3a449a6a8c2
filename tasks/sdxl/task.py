"""sdxl: Stable Diffusion XL-class latent diffusion (two text encoders whose hidden states the U-Net
reads side by side, the second one's pooled projection and the size and crop ids through the
U-Net's added "text_time" embedding) loaded from disk through diffusers, with classifier-free
guidance and a reward of the decoded image. Everything the `sd` task does holds here (its options,
samplers on the folder's own scheduler configuration, rewards, targets, v-prediction models,
docs/tasks.md); what differs:

- `model` is a pipeline folder with text_encoder_2/ and tokenizer_2/ besides sd's components, a
  model id in the local Hugging Face cache, or `tiny` (random, built offline: tasks/sdxl/tiny.py);
- the prompts are encoded once by the pipeline's own `encode_prompt`: both encoders' penultimate
  hidden states side by side, the pooled projection, and for the unguided half the negative
  prompt's, or zeros without one (the pipeline's force_zeros_for_empty_prompt);
- the size and crop ids are the pipeline's defaults for the resolution, (H, W, 0, 0, H, W);
- `cond` is the joint text embedding; the pooled projection and the ids stay fixed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from bench.errors import SpecError
from bench.options import Option
from tasks.sd import rewards
from tasks.sd.task import COMPONENTS, StableDiffusion, built_once
from tasks.sdxl import tiny

RENAMED = {"model"}


def resolve_model(model: str) -> Path:
    """A local SDXL pipeline folder for `model`: a path, a cached hub id, or tiny (built on first use)."""
    return built_once("sdxl-tiny", tiny.build) if model == "tiny" else rewards.local_folder(model, "model")


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    summary = "Stable Diffusion XL-class latent diffusion from a local diffusers folder (tiny: random, offline)"
    version = "1"
    components = (*COMPONENTS, "text_encoder_2", "tokenizer_2")
    networks = ("unet", "vae", "text_encoder", "text_encoder_2")
    tiny = ("tiny",)
    pipeline_class = "StableDiffusionXLPipeline"
    options = (
        Option("model", str, "tiny", "SDXL pipeline folder, cached model id, or tiny (random, built offline)"),
        *(option for option in StableDiffusion.options if option.name not in RENAMED),
    )

    def model_folder(self) -> Path:
        return resolve_model(self.model)

    def _check_text_width(self, configs: dict[str, dict]) -> None:
        owner, unet = f"sdxl[model={self.model}]", configs["unet"]
        if unet.get("addition_embed_type") != "text_time":
            raise SpecError(
                f"{owner}: the U-Net has addition_embed_type={unet.get('addition_embed_type')!r}; an SDXL U-Net "
                "reads the pooled text embedding and size ids (text_time); for SD 1.x and 2.x use sd"
            )
        width = configs["text_encoder"]["hidden_size"] + configs["text_encoder_2"]["hidden_size"]
        if unet["cross_attention_dim"] != width:
            raise SpecError(
                f"{owner}: the U-Net attends to {unet['cross_attention_dim']}-wide text embeddings but the two text "
                f"encoders give {width}; valid: a pipeline whose parts belong together"
            )

    def encode_prompts(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(
            self.folder, local_files_only=True, unet=None, vae=None, image_encoder=None, feature_extractor=None
        )
        negative = [self.negative_text] * len(self.prompt_list) if self.negative_text else None
        with torch.no_grad():
            embeds, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt=self.prompt_list,
                device=torch.device("cpu"),
                do_classifier_free_guidance=True,
                negative_prompt=negative,
            )
        self.prompt_embeds, self.pooled_embeds = embeds.float().to(self.device), pooled.float().to(self.device)
        self.uncond_embeds = uncond[:1].float().to(self.device)
        self.pooled_uncond = uncond_pooled[:1].float().to(self.device)

    def added_conditioning(self, order: list[int], dtype: torch.dtype) -> dict[str, Tensor]:
        side = self.latent_shape[-1] * 2 ** (len(self.vae.config.block_out_channels) - 1)
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=dtype, device=self.device)
        return {
            "text_embeds": self.pooled_embeds[order].to(dtype),
            "text_embeds_uncond": self.pooled_uncond.to(dtype),
            "time_ids": time_ids,
        }
