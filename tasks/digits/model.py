"""The digits denoiser: a diffusers UNet2DConditionModel whose conditioning is a continuous
embedding read through cross-attention, exactly as a text embedding is in Stable Diffusion.
Class k's embedding is a learned (TOKENS, WIDTH) table entry; entry 10 is the null embedding
that classifier-free guidance uses.

The digits transformer (`digits[model=transformer]`) is a diffusers SD3Transformer2DModel, the
MMDiT of Stable Diffusion 3, over 2x2 patches: the class embedding's tokens join the image tokens
in its joint attention, and their mean is its pooled projection (SD3 reads CLIP's pooled output
there), so both of its conditioning paths carry the class."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from torch import Tensor, nn

TOKENS, WIDTH = 4, 32
NULL_CLASS = 10

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=WIDTH,
    attention_head_dim=4,
    norm_num_groups=8,
)

TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=32,
    joint_attention_dim=WIDTH,
    caption_projection_dim=128,
    pooled_projection_dim=WIDTH,
    pos_embed_max_size=4,
)


# The sampler's noise levels (DDPM linear betas), read by bench.chain through DDIMScheduler.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
    timestep_spacing="trailing",
)


# The rectified-flow model's time scale: model time t = 1000 sigma, as FlowMatchEulerDiscreteScheduler.
FLOW_TIMESTEPS = 1000
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=FLOW_TIMESTEPS)


class ClassEmbedding(nn.Module):
    """Class index -> conditioning embedding (TOKENS x WIDTH), with a null entry for CFG."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(NULL_CLASS + 1, TOKENS * WIDTH)
        nn.init.normal_(self.table.weight, std=1.0)

    def forward(self, labels: Tensor) -> Tensor:
        return self.table(labels).view(-1, TOKENS, WIDTH)


class ClassTransformer(nn.Module):
    """An SD3Transformer2DModel called as the U-Net is, (x, t, encoder_hidden_states) -> .sample,
    with the mean of the class tokens as its pooled projection."""

    def __init__(self, transformer: SD3Transformer2DModel) -> None:
        super().__init__()
        self.transformer = transformer

    @classmethod
    def fresh(cls) -> ClassTransformer:
        return cls(SD3Transformer2DModel(**TRANSFORMER_CONFIG))

    def add_adapter(self, config) -> None:
        """LoRA adapters on the transformer (peft, through diffusers' adapter mixin)."""
        self.transformer.add_adapter(config)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor):
        return self.transformer(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=encoder_hidden_states.mean(dim=1),
        )


class GuidedDenoiser(nn.Module):
    """eps(x, t, c) with classifier-free guidance: eps_null + w (eps_c - eps_null), both halves in
    one batched U-Net call. `cond` is (TOKENS, WIDTH) or (B, TOKENS, WIDTH)."""

    def __init__(self, unet: UNet2DConditionModel, null_embedding: Tensor, guidance: float) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("null_embedding", null_embedding.detach().clone())
        self.guidance = guidance

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        batch = x.shape[0]
        cond = cond.expand(batch, TOKENS, WIDTH) if cond.dim() == 2 or cond.shape[0] == 1 else cond
        if self.guidance == 1.0:
            return self.unet(x, t, encoder_hidden_states=cond).sample
        null = self.null_embedding.to(cond).expand(batch, TOKENS, WIDTH)
        both = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([null, cond])).sample
        eps_null, eps_cond = both.chunk(2)
        return eps_null + self.guidance * (eps_cond - eps_null)
