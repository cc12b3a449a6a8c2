"""A tiny random-weight FLUX.1 pipeline, built offline from configuration dicts and saved with
`save_pretrained`, so that the `flux` task's loading path is the path a user's FLUX.1 folder
takes: a FluxTransformer2DModel (double-stream blocks over text and image tokens, then
single-stream blocks, rotary position ids, FLUX.1-dev's distilled guidance embedding), CLIP for the
pooled embedding and T5 for the token embeddings (its tokenizer's vocabulary written here: single
characters, no download), a VAE with FLUX's scaling and shift factors, and the dynamically shifted
flow-matching Euler scheduler. Its samples and rewards mean nothing; its costs scale like the real
model's."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from tasks.sd.tiny import TEXT, VAE, make_tokenizer

WIDTH = 32  # T5's d_model = the transformer's joint_attention_dim; CLIP's width = its pooled projection
TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,  # 2x2 patches of the 4-channel latent, packed
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=WIDTH,
    pooled_projection_dim=TEXT["hidden_size"],
    axes_dims_rope=[4, 4, 8],
    guidance_embeds=True,  # FLUX.1-dev; schnell has none
)
T5 = dict(d_model=WIDTH, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
# FLUX.1-dev's scheduler configuration: shift by the image's token count (mu)
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def make_t5_tokenizer():
    """A T5 tokenizer (unigram) over single characters and word-initial characters."""
    from transformers import T5TokenizerFast

    letters = string.ascii_lowercase + string.digits
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -1.0) for c in letters + string.punctuation] + [("▁" + c, -1.5) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def build(folder: Path, seed: int = 0) -> Path:
    """Write a tiny FLUX.1 pipeline to `folder` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer, text_config = make_tokenizer()
    t5_tokenizer = make_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TRANSFORMER)
        vae = AutoencoderKL(**{**VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159})
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **T5))
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    return Path(folder)
