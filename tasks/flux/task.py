"""flux: FLUX.1-class flow matching (`FluxTransformer2DModel`: double-stream blocks over text and
image tokens, then single-stream blocks, rotary position ids; CLIP's pooled embedding and T5's
token embeddings; latents packed into 2x2-patch tokens) loaded from disk through diffusers, with a
reward of the decoded image. What differs from `sd3` (whose loader, options and rewards it shares):

- guidance: FLUX.1-dev was distilled with its guidance scale as an input (`guidance`, 3.5 by
  default): one transformer call per step, no unconditional half. A model without the guidance
  embedding (FLUX.1-schnell) takes none (`guidance` must stay unset there); true classifier-free
  guidance with a negative prompt is not taken;
- the sampler: flow-matching Euler on the pipeline's own grid, sigmas linspace(1, 1/N, N)
  shifted by mu, which grows with the image's token count (the scheduler's dynamic shifting,
  calculate_shift of FluxPipeline);
- the chain's state is the packed latent (tokens of 2x2 patches, FluxPipeline's own latents),
  unpacked for the VAE decode, x = D(z / scaling + shift).

Targets: latent (the packed initial noise), cond (T5's token embeddings; the pooled CLIP embedding
stays fixed), weights (LoRA on the attention projections of both stream kinds, or tune=full)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.errors import SpecError
from bench.options import Option, at_least
from bench.gating import GATES
from tasks.flux import tiny
from tasks.sd import rewards
from tasks.sd.task import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, built_once
from tasks.sd3.task import StableDiffusion3

DROPPED = {"guidance", "negative_prompt", "negative_prompt_file", "sampler", "model", "eta"}


def resolve_model(model: str) -> Path:
    """A local FLUX.1 pipeline folder for `model`: a path, a cached hub id, or tiny (built on first use)."""
    return built_once("flux-tiny", tiny.build) if model == "tiny" else rewards.local_folder(model, "model")


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, HW/4, 4C): FluxPipeline's 2x2-patch tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: Tensor, side: int) -> Tensor:
    """pack's inverse for a square latent of `side` pixels."""
    b, _, channels = tokens.shape
    x = tokens.view(b, side // 2, side // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, side, side)


def image_ids(side: int) -> Tensor:
    """The rotary position ids of the image tokens: (0, row, column) per 2x2 patch."""
    ids = torch.zeros(side // 2, side // 2, 3)
    ids[..., 1] += torch.arange(side // 2)[:, None]
    ids[..., 2] += torch.arange(side // 2)[None, :]
    return ids.reshape(-1, 3)


def dynamic_shift(tokens: int, config: dict) -> float:
    """mu of the scheduler's dynamic shifting: linear in the image's token count (FluxPipeline's
    calculate_shift), from base_shift at base_image_seq_len to max_shift at max_image_seq_len."""
    base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return low + (high - low) * (tokens - base) / (top - base)


class GuidedFlux(nn.Module):
    """v(x, t, c): one transformer call with the distilled guidance scale as an input (or none)."""

    def __init__(self, transformer: nn.Module, pooled: Tensor, text_ids: Tensor, img_ids: Tensor, guidance):
        super().__init__()
        self.transformer, self.guidance = transformer, guidance
        self.register_buffer("pooled", pooled.detach().clone())
        self.register_buffer("text_ids", text_ids.detach().clone())
        self.register_buffer("img_ids", img_ids.detach().clone())

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        dtype, batch = self.transformer.dtype, x.shape[0]
        cond = cond.to(dtype).expand(batch, *cond.shape[-2:]) if cond.shape[0] == 1 else cond.to(dtype)
        t = (t.expand(batch) if t.dim() == 0 or t.shape[0] == 1 else t).to(dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((batch,), self.guidance, dtype=torch.float32, device=x.device)
        out = self.transformer(
            hidden_states=x.to(dtype),
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=self.pooled.to(dtype).expand(batch, -1),
            encoder_hidden_states=cond,
            txt_ids=self.text_ids.to(dtype),
            img_ids=self.img_ids.to(dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)


class Flux(StableDiffusion3):
    pipeline_class = "FluxPipeline"
    label = "FLUX.1"
    folders = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    required = {
        "transformer": (DIFFUSERS_WEIGHTS, ("in_channels", "joint_attention_dim", "pooled_projection_dim")),
        "vae": (DIFFUSERS_WEIGHTS, ("latent_channels", "block_out_channels")),
        "text_encoder": (TRANSFORMERS_WEIGHTS, ("hidden_size",)),
        "text_encoder_2": (TRANSFORMERS_WEIGHTS, ("d_model",)),
    }
    name = "flux"
    summary = "FLUX.1-class flow-matching transformer from a local diffusers folder (tiny: random, offline)"
    version = "1"
    sampler = ""  # FLUX's own flow-matching Euler grid, dynamically shifted
    eta = 0.0  # deterministic: no flow-sde on the shifted grid yet
    targets = ("latent", "cond", "weights", GATES)
    gate_time_scale = 1 / 1000  # FLUX's transformer reads the noise level sigma = t / 1000
    negative_prompt = negative_prompt_file = ""
    options = (
        Option("model", str, "tiny", "FLUX.1 pipeline folder, cached model id, or tiny (random, built offline)"),
        Option(
            "guidance",
            float,
            None,
            "the distilled guidance scale the transformer reads (FLUX.1-dev: 3.5 when unset); must stay "
            "unset for a model without the guidance embedding (schnell)",
            check=at_least(0.0),
            metavar="scale",
        ),
        Option(
            "max_sequence_length",
            int,
            512,
            "T5 tokens per prompt (the pipeline's max_sequence_length)",
            check=at_least(1),
        ),
        *(option for option in StableDiffusion3.options if option.name not in DROPPED | {"guidance"}),
    )

    def model_folder(self) -> Path:
        return resolve_model(self.model)

    def preflight(self) -> None:
        super().preflight()
        owner = f"flux[model={self.model}]"
        config = self._configs["transformer"]
        self.distilled = bool(config.get("guidance_embeds", False))
        if not self.distilled and self.guidance is not None:
            raise SpecError(
                f"{owner}: guidance={self.guidance}: this transformer has no guidance embedding (FLUX.1-schnell "
                "is guidance-distilled away); leave guidance unset"
            )
        if self.max_sequence_length > 512:
            raise SpecError(f"flux[max_sequence_length={self.max_sequence_length}]: T5 takes at most 512 tokens")

    def _latent_shape(self, configs: dict[str, dict]) -> tuple[int, int]:
        self._configs = configs
        transformer, vae, owner = configs["transformer"], configs["vae"], f"flux[model={self.model}]"
        if transformer["in_channels"] != 4 * vae["latent_channels"]:
            raise SpecError(
                f"{owner}: the transformer takes {transformer['in_channels']} channels per token but 2x2 patches of "
                f"the VAE's latents have {4 * vae['latent_channels']}; valid: a text-to-image FLUX.1 pipeline"
            )
        vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
        # FluxPipeline's default: 128 latent pixels a side (1024² for FLUX.1); the tiny pipeline's is 32²
        size = self.resolution or (32 if self.model == "tiny" else 128 * vae_scale)
        step = 2 * vae_scale
        if size % step or size < step:
            raise SpecError(
                f"flux[resolution={size}]: must be a positive multiple of {step} (the VAE's {vae_scale}x "
                f"downsampling times the 2x2 packing); e.g. {max(step, size - size % step)}"
            )
        self.latent_side = size // vae_scale
        return ((self.latent_side // 2) ** 2, transformer["in_channels"])

    def make_schedule(self, steps: int):
        """FluxPipeline's grid: sigmas linspace(1, 1/N, N) with the dynamic shift mu of this image size."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from bench.samplers import check_steps_argument
        from bench.samplers.flow_euler import FlowEulerSchedule

        config = self.scheduler_config()
        check_steps_argument(steps, config.get("num_train_timesteps", 1000))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        kwargs = {"mu": dynamic_shift(self.latent_shape[0], config)} if config.get("use_dynamic_shifting") else {}
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kwargs)
        schedule = FlowEulerSchedule.on_grid(scheduler)
        object.__setattr__(schedule, "sampler", "flow-euler[flux]")
        return schedule

    def left_out(self) -> dict:
        return {}

    def encode_prompts_with(self, pipe) -> None:
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=self.prompt_list,
            prompt_2=None,
            device=torch.device("cpu"),
            max_sequence_length=self.max_sequence_length,
        )
        self.prompt_embeds, self.pooled_embeds = embeds.float().to(self.device), pooled.float().to(self.device)
        self.text_ids = text_ids.float().to(self.device)

    def guided(self, transformer: nn.Module, order: list[int], dtype: torch.dtype) -> nn.Module:
        scale = (3.5 if self.guidance is None else self.guidance) if self.distilled else None
        return GuidedFlux(
            transformer,
            self.pooled_embeds[order].to(dtype),
            self.text_ids.to(dtype),
            image_ids(self.latent_side).to(self.device, dtype),
            scale,
        )

    def initial_latent(self, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        channels = self.latent_shape[1] // 4
        noise = torch.randn(self.batch, channels, self.latent_side, self.latent_side, generator=generator)
        return pack(noise).to(self.device, dtype)

    def decode(self, latents: Tensor, vae: nn.Module) -> Tensor:
        return super().decode(unpack(latents, self.latent_side), vae)
