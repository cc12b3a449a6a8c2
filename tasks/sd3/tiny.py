"""A tiny random-weight Stable Diffusion 3 pipeline, built offline from configuration dicts and
saved with `save_pretrained`, so that the `sd3` task's loading path (a folder on disk) is the path
a user's SD3 / SD3.5 folder takes: an MMDiT (`SD3Transformer2DModel`, joint attention over text
and image tokens, a pooled text projection), two CLIP text encoders with projections, no T5 (the
pipeline then reads zeros in its place, as it does for a user who drops T5), a VAE with SD3's
scaling and shift factors, and the flow-matching Euler scheduler with SD3's shift of 3.0. Its
samples and rewards mean nothing; its costs scale like the real model's."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.sd.tiny import TEXT, make_tokenizer
from tasks.sd.tiny import VAE as SD_VAE

TRANSFORMER = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,  # the two CLIPs' hidden states side by side (T5's width in SD3)
    caption_projection_dim=32,
    pooled_projection_dim=64,  # the two CLIPs' pooled projections side by side
    pos_embed_max_size=32,
)
# sd's tiny VAE with SD3's scaling and shift, and no quantisation convolutions (SD3's VAE has none)
VAE = {
    **SD_VAE,
    "scaling_factor": 1.5035,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def build(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SD3 pipeline to `folder` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer, text_config = make_tokenizer()
    clip = CLIPTextConfig(**{**text_config, "projection_dim": 32})
    assert 2 * TEXT["hidden_size"] == TRANSFORMER["joint_attention_dim"] == 2 * clip.projection_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TRANSFORMER)
        vae = AutoencoderKL(**VAE)
        text_encoder = CLIPTextModelWithProjection(clip)
        text_encoder_2 = CLIPTextModelWithProjection(clip)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "text_encoder_3=None cannot be saved": none is meant
    try:
        pipeline.save_pretrained(folder)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return Path(folder)
