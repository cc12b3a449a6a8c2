"""A tiny random-weight Stable Diffusion XL pipeline, built offline from configuration dicts and
saved with `save_pretrained`, so that the `sdxl` task's loading path is the path a user's SDXL
folder takes: a U-Net that reads two text encoders' hidden states side by side and, through its
added "text_time" embedding, the second encoder's pooled projection and the size and crop ids; a
VAE with SDXL's scaling factor; SDXL's Euler scheduler configuration. Its samples and rewards mean
nothing; its costs scale like the real model's."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tasks.sd.tiny import TEXT, VAE, make_tokenizer

POOLED = 32  # the second text encoder's projection
TIME_EMBED = 8  # per size or crop id; six of them
UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED,
    cross_attention_dim=2 * TEXT["hidden_size"],
)
# SDXL's scheduler configuration as it ships (Euler, leading spacing, steps_offset = 1)
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
)
DDIM_KEYS = dict(clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0)


def build(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline to `folder` and return it."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer, text_config = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**{**VAE, "scaling_factor": 0.13025, "force_upcast": False})
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, projection_dim=POOLED))
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )
    pipeline.save_pretrained(folder)
    # SDXL's scheduler_config.json carries the DDIM keys besides Euler's (clip_sample and
    # set_alpha_to_one false), so that a from_config swap to DDIM takes the plain step
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **DDIM_KEYS}, indent=2))
    return Path(folder)
