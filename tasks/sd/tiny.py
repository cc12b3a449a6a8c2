"""A tiny random-weight Stable Diffusion pipeline, built offline from configuration dicts and
saved with `save_pretrained`, so that the `sd` task's loading path (a folder on disk) is the path a
user's SD 1.x folder takes. Its samples and rewards mean nothing; its costs scale like the real
model's (a text encoder, a cross-attention U-Net in a 4-channel latent space, a VAE decoder).

The tokenizer's vocabulary is written here: byte-level BPE symbols with no merges, so every
character is one token (diffusers' own tests download a tiny tokenizer instead)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
)
VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    sample_size=32,
)
TEXT = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, max_position_embeddings=77
)
# SD 1.x's scheduler configuration as it ships (leading spacing, steps_offset = 1).
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)
START, END = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's reversible map of the 256 bytes to printable characters."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for byte in range(256):
        if byte in keep:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def make_tokenizer():
    """(a CLIPTokenizer over byte-level symbols with no merges, the text encoder's config entries
    that must agree with its vocabulary). The vocabulary files are written to a temporary folder:
    save_pretrained copies them where they belong."""
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    vocab = {START: 0, END: 1}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    with tempfile.TemporaryDirectory() as files:
        (Path(files) / "vocab.json").write_text(json.dumps(vocab))
        (Path(files) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(f"{files}/vocab.json", f"{files}/merges.txt", model_max_length=77)
    text = dict(
        vocab_size=len(vocab), bos_token_id=vocab[START], eos_token_id=vocab[END], pad_token_id=vocab[END], **TEXT
    )
    return tokenizer, text


def build(folder: Path, seed: int = 0, prediction: str = "epsilon") -> Path:
    """Write a tiny SD pipeline to `folder` (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) and return it; `prediction`: the scheduler's prediction_type (epsilon as SD
    1.x, v_prediction as SD 2.x at 768²)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer, text_config = make_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(**text_config))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**{**SCHEDULER, "prediction_type": prediction}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return Path(folder)


def build_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel folder (with its tokenizer) for the CLIP reward's loading path."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer, text_config = make_tokenizer()
    config = CLIPConfig(
        text_config=text_config,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
