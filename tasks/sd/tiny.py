"""A tiny random-weight Stable Diffusion pipeline, built offline from configuration dicts and
saved with `save_pretrained`, so that the `sd` task's loading path (a folder on disk) is the path a
user's SD 1.x folder takes. Its samples and rewards mean nothing; its costs scale like the real
model's (a text encoder, a cross-attention U-Net in a 4-channel latent space, a VAE decoder).

The tokenizer's vocabulary is written here: byte-level BPE symbols with no merges, so every
character is one token (diffusers' own tests download a tiny tokenizer instead)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
VAE = dict(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           sample_size=32)
TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
            max_position_embeddings=77)
# SD 1.x's scheduler configuration as it ships (leading spacing, steps_offset = 1).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                 prediction_type="epsilon")
START, END = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's reversible map of the 256 bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in keep:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab = {START: 0, END: 1}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def build(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SD pipeline to `folder` (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    folder = Path(folder)
    vocab = write_tokenizer(folder / "_tokenizer_files")
    tokenizer = CLIPTokenizer(str(folder / "_tokenizer_files" / "vocab.json"),
                              str(folder / "_tokenizer_files" / "merges.txt"), model_max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[START],
                                            eos_token_id=vocab[END], pad_token_id=vocab[END], **TEXT))
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    for leftover in (folder / "_tokenizer_files").iterdir():
        leftover.unlink()
    (folder / "_tokenizer_files").rmdir()
    return folder


def build_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel folder (with its tokenizer) for the CLIP reward's loading path."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    files = folder / "_tokenizer_files"
    vocab = write_tokenizer(files)
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), bos_token_id=vocab[START], eos_token_id=vocab[END],
                         pad_token_id=vocab[END], **TEXT),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for leftover in files.iterdir():
        leftover.unlink()
    files.rmdir()
    return folder
