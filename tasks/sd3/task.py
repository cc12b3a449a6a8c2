"""sd3: Stable Diffusion 3 / 3.5-class flow matching (an MMDiT, `SD3Transformer2DModel`, reading
text and image tokens in joint attention and a pooled text projection; two CLIP text encoders and
an optional T5; a 16-channel VAE with a scaling and a shift factor) loaded from disk through
diffusers, with classifier-free guidance and a reward of the decoded image.

`model` is a pipeline folder as `save_pretrained` writes it (transformer/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, and text_encoder_3/ + tokenizer_3/ for T5,
which may be left out as the pipeline allows), a model id already in the local Hugging Face cache,
or `tiny` (a random pipeline built offline without T5, tasks/sd3/tiny.py). Everything is loaded
with local_files_only=True. The prompts are encoded once by the pipeline's own `encode_prompt`
(the joint-attention tokens and the pooled projection, for the prompts and for the negative
prompt); the text encoders are then released. The sampler is flow-matching Euler on the folder's
scheduler configuration (its shift, 3.0 for SD3), tested equal to StableDiffusion3Pipeline's own
latents; the velocity is guided as the pipeline guides it, v_u + w (v_c - v_u), both halves in
one transformer call, unconditional first. The VAE decode, x = D(z / scaling + shift), sits
inside the reward path.

Targets: latent (x_1, the initial noise), cond (the prompts' joint-attention tokens; the pooled
projection stays fixed), weights (LoRA on the attention projections of both streams, to_q, to_k,
to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out; or all transformer weights with
tune=full). The sampler is deterministic: no noise target. The other options mean what they mean
for `sd` (docs/tasks.md)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from bench.chain import Chain
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import Problem
from bench.rewards import REWARDS
from tasks.base import Task
from bench.gating import GATES
from tasks.sd import rewards
from tasks.sd.task import (
    DIFFUSERS_WEIGHTS,
    built_once,
    TRANSFORMERS_WEIGHTS,
    StableDiffusion,
    _is_count,
    quiet_loading,
    read_json_object,
)
from tasks.sd3 import tiny

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
REQUIRED = {  # component -> (weights files, config entries the shapes depend on)
    "transformer": (DIFFUSERS_WEIGHTS, ("in_channels", "patch_size", "sample_size", "joint_attention_dim")),
    "vae": (DIFFUSERS_WEIGHTS, ("latent_channels", "block_out_channels")),
    "text_encoder": (TRANSFORMERS_WEIGHTS, ("hidden_size",)),
    "text_encoder_2": (TRANSFORMERS_WEIGHTS, ("hidden_size",)),
}
FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DROPPED = {"guidance_rescale", "tune", "model", "guidance", "resolution"}


def resolve_model(model: str) -> Path:
    """A local SD3 pipeline folder for `model`: a path, a cached hub id, or tiny (built on first use)."""
    return built_once("sd3-tiny", tiny.build) if model == "tiny" else rewards.local_folder(model, "model")


class GuidedTransformer(nn.Module):
    """v(x, t, c) = v_u + w (v_c - v_u), both halves in one transformer call (the pipeline's order:
    unconditional first), each half with its pooled projection. The transformer runs in its own
    dtype; x and c may be float32 leaves."""

    def __init__(self, transformer: nn.Module, uncond: Tensor, pooled: Tensor, pooled_uncond: Tensor, guidance: float):
        super().__init__()
        self.transformer, self.guidance = transformer, guidance
        self.register_buffer("uncond", uncond.detach().clone())
        self.register_buffer("pooled", pooled.detach().clone())
        self.register_buffer("pooled_uncond", pooled_uncond.detach().clone())

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        dtype = self.transformer.dtype
        batch = x.shape[0]
        cond = cond.to(dtype).expand(batch, *cond.shape[-2:]) if cond.shape[0] == 1 else cond.to(dtype)
        pooled = self.pooled.to(dtype).expand(batch, -1) if self.pooled.shape[0] == 1 else self.pooled.to(dtype)
        t = t.expand(batch) if t.dim() == 0 or t.shape[0] == 1 else t
        if self.guidance == 1.0:
            out = self.transformer(
                hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=cond, pooled_projections=pooled
            ).sample
            return out.to(x.dtype)
        uncond = self.uncond.to(dtype).expand_as(cond)
        pooled_uncond = self.pooled_uncond.to(dtype).expand_as(pooled)
        both = self.transformer(
            hidden_states=torch.cat([x, x]).to(dtype),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([uncond, cond]),
            pooled_projections=torch.cat([pooled_uncond, pooled]),
        ).sample.to(x.dtype)
        v_uncond, v_cond = both.chunk(2)
        return v_uncond + self.guidance * (v_cond - v_uncond)


class StableDiffusion3(StableDiffusion):
    pipeline_class = "StableDiffusion3Pipeline"
    label = "SD3"
    tiny = ("tiny",)
    folders = FOLDERS
    required = REQUIRED
    name = "sd3"
    summary = "Stable Diffusion 3 / 3.5-class flow-matching MMDiT from a local diffusers folder (tiny: random, offline)"
    version = "1"
    learning_rates = {"latent": 0.05, "cond": 0.01, "weights": 1e-3, GATES: 0.1}
    targets = ("latent", "cond", "weights", "noise", GATES)  # noise: with sampler=flow-sde and eta > 0
    gated_path = ("transformer",)
    options = (
        Option("model", str, "tiny", "SD3 pipeline folder, cached model id, or tiny (random, built offline, no T5)"),
        Option("guidance", float, 7.0, "classifier-free guidance scale (1: none)", check=at_least(1.0)),
        Option(
            "resolution",
            int,
            0,
            "image size in pixels, a multiple of the VAE's downsampling times the patch size "
            "(0: the transformer's sample size times the VAE's downsampling)",
            check=at_least(0),
        ),
        Option(
            "tune",
            str,
            "lora",
            "weights target: LoRA on the attention projections of both streams, or all transformer weights",
            choices=("lora", "full"),
        ),
        *(option for option in StableDiffusion.options if option.name not in DROPPED),
    )

    def model_folder(self) -> Path:
        return resolve_model(self.model)

    def preflight(self) -> None:
        self._checked = True
        owner = f"{self.name}[model={self.model}]"
        self.folder = self.model_folder()
        missing = [name for name in self.folders if not (self.folder / name).is_dir()]
        if missing:
            raise SpecError(
                f"{owner}: {self.folder} is not a pipeline folder of {self.label} "
                f"(no {', '.join(n + '/' for n in missing)}); valid: a folder {self.pipeline_class}.save_pretrained wrote"
            )
        index = (
            read_json_object(self.folder / "model_index.json", owner)
            if (self.folder / "model_index.json").is_file()
            else {}
        )
        kind = index.get("_class_name", self.pipeline_class)
        if kind != self.pipeline_class:
            raise SpecError(
                f"{owner}: model_index.json names {kind}; valid: {self.pipeline_class} "
                "(sd: SD 1.x and 2.x, sdxl: SDXL, sd3: SD3 and SD3.5, flux: FLUX.1)"
            )
        configs = {}
        for name, (files, entries) in self.required.items():
            config = read_json_object(self.folder / name / "config.json", owner)
            lacking = [key for key in entries if key not in config]
            if lacking:
                raise SpecError(f"{owner}: {self.folder / name / 'config.json'} lacks {', '.join(lacking)}")
            if not any((self.folder / name / file).is_file() for file in files):
                raise SpecError(f"{owner}: no weights in {self.folder / name} (expected {files[0]} or {files[1]})")
            configs[name] = config
        self.has_t5 = (self.folder / "text_encoder_3").is_dir() and (self.folder / "tokenizer_3").is_dir()
        self.latent_shape = self._latent_shape(configs)
        self.prompt_list = self._read_prompts()
        self.negative_text = self._read_negative_prompt()
        if self.guidance == 1.0 and self.negative_text:
            raise SpecError(
                f"{self.name}: negative_prompt acts on classifier-free guidance, which guidance=1 turns off"
            )
        config = read_json_object(self.folder / "scheduler" / "scheduler_config.json", owner)
        train = config.get("num_train_timesteps", 1000)
        if not _is_count(train):
            raise SpecError(f"{owner}: scheduler_config.json: num_train_timesteps={train!r} is not a positive integer")
        self.train_timesteps, self.pipeline_scheduler = train, config
        Task.preflight(self)  # the sampler against the model
        try:
            self.make_schedule(1)
        except SpecError as exc:
            raise SpecError(f"{owner}: {self.folder / 'scheduler' / 'scheduler_config.json'}: {exc}") from None
        REWARDS.preflight(self.reward, self, rewards.IMAGE)
        self._student = self.read_student("transformer", configs["transformer"])

    def _latent_shape(self, configs: dict[str, dict]) -> tuple[int, int, int]:
        transformer, vae, owner = configs["transformer"], configs["vae"], f"{self.name}[model={self.model}]"
        if transformer["in_channels"] != vae["latent_channels"]:
            raise SpecError(
                f"{owner}: the transformer takes {transformer['in_channels']} channels but the VAE's latents have "
                f"{vae['latent_channels']}; valid: a pipeline whose parts belong together"
            )
        vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
        step = vae_scale * transformer["patch_size"]
        size = self.resolution or transformer["sample_size"] * vae_scale
        if size % step or size < step:
            raise SpecError(
                f"{self.name}[resolution={size}]: must be a positive multiple of {step} (the VAE's {vae_scale}x downsampling "
                f"times the transformer's patch size {transformer['patch_size']}); e.g. {max(step, size - size % step)}"
            )
        return (vae["latent_channels"], size // vae_scale, size // vae_scale)

    @property
    def model_prediction(self) -> str:
        return "flow"

    def scheduler_config(self) -> dict:
        self._check_once()
        return dict(self.pipeline_scheduler)

    def setup(self, device: torch.device) -> None:
        import diffusers

        Task.setup(self, device)
        quiet_loading()
        self._check_once()
        pipe = getattr(diffusers, self.pipeline_class).from_pretrained(
            self.folder, local_files_only=True, image_encoder=None, feature_extractor=None, **self.left_out()
        )
        with torch.no_grad():
            self.encode_prompts_with(pipe)
        dtype = self.network_dtype
        self.transformer = pipe.transformer.to(device, dtype).eval().requires_grad_(False)
        self.vae = pipe.vae.to(device, dtype).eval().requires_grad_(False)
        del pipe  # the text encoders are not needed again
        self._reward = REWARDS.build(self.reward, self, rewards.IMAGE)
        self._copies = {}

    def left_out(self) -> dict:
        """Components the folder does not have, given to from_pretrained as None (T5 may be)."""
        return {} if self.has_t5 else {"text_encoder_3": None, "tokenizer_3": None}

    def encode_prompts_with(self, pipe) -> None:
        """The pipeline's own encodings of the prompts and of the negative prompt, computed once."""
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=self.prompt_list,
            prompt_2=None,
            prompt_3=None,
            device=torch.device("cpu"),
            negative_prompt=[self.negative_text] * len(self.prompt_list),
        )
        self.prompt_embeds, self.pooled_embeds = embeds.float().to(self.device), pooled.float().to(self.device)
        self.uncond_embeds = negative[:1].float().to(self.device)
        self.pooled_uncond = negative_pooled[:1].float().to(self.device)

    def decode(self, latents: Tensor, vae: nn.Module) -> Tensor:
        """Images in [0, 1] from latents (the pipeline's unscaling and shift, decode and postprocessing)."""
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(z).sample
        return (images.to(latents.dtype) / 2 + 0.5).clamp(0, 1)

    def guided(self, transformer: nn.Module, order: list[int], dtype: torch.dtype) -> nn.Module:
        """The denoiser the chain calls: the transformer with its guidance and fixed conditioning."""
        return GuidedTransformer(
            transformer,
            self.uncond_embeds.to(dtype),
            self.pooled_embeds[order].to(dtype),
            self.pooled_uncond.to(dtype),
            self.guidance,
        )

    def initial_latent(self, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        """x_1: the pipeline's initial noise, in the chain's state layout."""
        return torch.randn(self.batch, *self.latent_shape, generator=generator).to(self.device, dtype)

    def make_problem(self, target: str, steps: int, seed: int, dtype: torch.dtype | None = None) -> Problem:
        self.check_target(target)
        if target == GATES:
            return self.gate_problem(steps, seed, dtype)
        dtype = dtype or self.dtype
        transformer = self.trainable_copy(self.transformer, target, seed, dtype, LORA_TARGETS)
        order = [b % len(self.prompt_list) for b in range(self.batch)]
        denoiser = self.guided(transformer, order, dtype)
        generator = torch.Generator().manual_seed(seed)
        x_start = self.initial_latent(generator, dtype)
        noises = [self.initial_latent(generator, dtype) for _ in range(steps)] if self.eta > 0 else None
        cond = self.prompt_embeds[order].clone().to(self.device, dtype)
        leaves = self.leaves_for(target, x_start, cond, noises, denoiser)
        vae, reward = self._networks(dtype)

        def reward_of(x0: Tensor) -> Tensor:
            return reward(self.decode(x0, vae))

        problem = Problem(
            chain=Chain(denoiser, self.make_schedule(steps)),
            x_start=x_start,
            cond=cond,
            noises=noises,
            reward_fn=reward_of,
            target=target,
            leaves=leaves,
        )
        self.attach_student(problem)
        return problem
