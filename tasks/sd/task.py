"""sd: Stable Diffusion-class latent diffusion (text encoder, cross-attention U-Net in a 4-channel
latent space, VAE decoder) loaded from disk through diffusers, with classifier-free guidance and a
reward of the decoded image.

`model` is a pipeline folder as `save_pretrained` writes it (unet/, vae/, text_encoder/,
tokenizer/, scheduler/), a model id already in the local Hugging Face cache, or `tiny` (a random
1.4 M-parameter pipeline built offline: its costs scale like the real thing, its rewards mean
nothing; `tiny-v` is the same with SD 2.x's v-prediction). Epsilon and v-prediction models both
run (a v model's output is turned into the epsilon it implies, so every sampler of epsilon models
drives it). Everything is loaded with local_files_only=True. The sampler (`sampler`: DDIM by
default, DPM-Solver++ 2M...) runs on the scheduler configuration the pipeline ships (steps_offset,
timestep spacing and set_alpha_to_one taken from it), tested equal to StableDiffusionPipeline's
own latents. The VAE decode sits inside the reward path, so its time and memory count, as in
DRaFT and AlignProp.

The prompts (`prompt`, one for every sample, `prompt=` being the unconditional prompt; or a
`prompts` file), `negative_prompt` and `guidance_rescale` mean what StableDiffusionPipeline's
arguments of those names mean, and the chain is tested equal to the pipeline with each of them.

Targets: latent (x_T), cond (the prompts' text-encoder output embeddings), weights (U-Net LoRA on
the attention projections, as diffusers' LoRA training scripts; or all U-Net weights with
tune=full), noise (eta > 0). Frozen networks run in the option `dtype` (`network_dtype`); the
optimised leaves stay float32 (`Task.dtype`, the precision of the estimators' runs).

shortcut-model's few-step student (`student`, `student_steps`, `student_bound`; tasks/shortcut): a
folder the repo's distillation wrote, a diffusers-format LoRA, or a distilled checkpoint of the same
architecture, run on the task's sampler at K steps where it is deterministic.

The exact reference: float64 backprop where that fits (`reference=auto` picks it for tiny); at SD
size checkpointed backprop in the task's precision (`reference=task`), or none (`reference=off`:
agreement is not measured, rows say so)."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.capabilities import FEW_STEP_BOUND, FEW_STEP_CHAIN
from bench.chain import Chain, alpha_bar_at_time
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import TARGETS, Problem
from bench.rewards import REWARDS
from bench import gating
from tasks.base import Task, sampler_option
from tasks.cache import add_file, cache_root
from bench.gating import GATES
from tasks.sd import rewards, tiny
from tasks.shortcut import denoising_network, student_chain
from tasks.shortcut.sources import StudentSource, read_source

PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolour painting of a lighthouse at dusk",
    "a close-up photo of a red fox in the snow",
    "an oil painting of a bowl of lemons",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TINY = {"tiny": "epsilon", "tiny-v": "v_prediction"}  # built offline: model name -> prediction type
PREDICTIONS = ("epsilon", "v_prediction")
# The largest trajectory error a student may have, as a fraction of the undistilled K-step chain's
# (tasks/shortcut/check.py): the undistilled chain is at 1 by definition. Measured at N = 20 and 50
# for students python -m tasks.shortcut distilled: 0.36 to 0.59 on tiny sd and sdxl (K = 2 and 4),
# 0.16 to 0.22 on tiny sd3, 0.26 on the digits transformer; randomly perturbed weights 1.0 to 2.2.
STUDENT_BOUND = 0.7


def quiet_loading() -> None:
    """Loading a pipeline prints warnings and progress bars of no use to a sweep: errors only."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def built_once(name: str, build) -> Path:
    """The pipeline folder `name` under the cache, written by build(folder) on first use (a tiny
    random pipeline)."""
    folder = cache_root() / name
    if not (folder / "model_index.json").exists():
        build(folder)
    return folder


def resolve_model(model: str, what: str = "model") -> Path:
    """A local pipeline folder for `model`: a path, a cached hub id, or tiny (built on first use)."""
    if model in TINY:
        return built_once(f"sd-{model}", lambda folder: tiny.build(folder, prediction=TINY[model]))
    return rewards.local_folder(model, what)


def _fingerprint(folder: Path) -> str:
    """Path, size and the first and last MiB of every file: cheap for a 4 GB checkpoint, and a
    retrained or replaced model changes it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        add_file(digest, file, str(file.relative_to(folder)))
    return digest.hexdigest()[:16]


def _guidance(value: float) -> str | None:
    return None if value >= 1.0 else "must be >= 1 (1: no classifier-free guidance)"


def _rescale(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1] (0: off; Lin et al. suggest 0.7)"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


# The files from_pretrained loads when no variant is named: one file, or the index of shards.
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
WEIGHT_FILES = {
    "unet": DIFFUSERS_WEIGHTS,
    "vae": DIFFUSERS_WEIGHTS,
    "text_encoder": TRANSFORMERS_WEIGHTS,
    "text_encoder_2": TRANSFORMERS_WEIGHTS,
}
# The configuration entries the task and the networks' shapes depend on; a missing one would make
# from_pretrained build a default architecture the weights do not fit.
REQUIRED_CONFIG = {
    "unet": ("in_channels", "sample_size", "block_out_channels", "cross_attention_dim"),
    "vae": ("latent_channels", "block_out_channels"),
    "text_encoder": ("hidden_size",),
    "text_encoder_2": ("hidden_size",),
}


def read_json_object(path: Path, owner: str) -> dict:
    """The JSON object in `path`, or a one-line SpecError that names the file."""
    if not path.is_file():
        raise SpecError(f"{owner}: {path} is missing")
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise SpecError(f"{owner}: {path} is not readable JSON ({rewards.first_line(exc)})") from None
    if not isinstance(value, dict):
        raise SpecError(f"{owner}: {path} holds a JSON {type(value).__name__}, not an object of settings")
    return value


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_counts(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_count(v) for v in value)


def _valid_entry(key: str, value) -> bool:
    if key == "block_out_channels":
        return _is_counts(value)
    if key in ("sample_size", "cross_attention_dim"):  # per axis or per block in some configs
        return _is_count(value) or _is_counts(value)
    return _is_count(value)


def read_component(folder: Path, name: str, owner: str) -> dict:
    """The checked configuration of a network folder (unet/, vae/, text_encoder/): readable JSON
    with the entries REQUIRED_CONFIG names, and a weights file from_pretrained would load."""
    config = read_json_object(folder / name / "config.json", owner)
    missing = [key for key in REQUIRED_CONFIG[name] if key not in config]
    if missing:
        raise SpecError(
            f"{owner}: {folder / name / 'config.json'} lacks {', '.join(missing)} "
            "(a config.json as save_pretrained writes it has them)"
        )
    for key in REQUIRED_CONFIG[name]:
        if not _valid_entry(key, config[key]):
            raise SpecError(
                f"{owner}: {folder / name / 'config.json'}: {key}={config[key]!r} is not a positive "
                "integer" + (" list" if key == "block_out_channels" else "")
            )
    if not any((folder / name / file).is_file() for file in WEIGHT_FILES[name]):
        found = sorted(p.name for p in (folder / name).iterdir() if p.suffix in (".safetensors", ".bin"))
        hint = f"; found only {', '.join(found)} (variants are not loaded)" if found else ""
        raise SpecError(
            f"{owner}: no weights in {folder / name} (expected {WEIGHT_FILES[name][0]} or "
            f"{WEIGHT_FILES[name][1]}){hint}"
        )
    return config


def read_text_file(path: Path, owner: str, what: str) -> str:
    """A UTF-8 text file's contents (a byte-order mark allowed), or a one-line SpecError for a
    missing, unreadable or binary file."""
    if not path.is_file():
        raise SpecError(f"{owner}: no such file ({what})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{owner}: cannot read it ({rewards.first_line(exc)})") from None
    if b"\0" in data:
        raise SpecError(f"{owner}: not a text file (it holds NUL bytes); give UTF-8 text, {what}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{owner}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); give UTF-8 text, {what}"
        ) from None


class GuidedUNet(nn.Module):
    """eps(x, t, c) = eps_u + w (eps_c - eps_u), both halves in one U-Net call (the pipeline's
    order: unconditional first). The unconditional half is conditioned on `uncond`: the negative
    prompt's embedding, the empty prompt's when there is none (StableDiffusionPipeline's
    negative_prompt). With `rescale` = phi > 0 the guided prediction is rescaled as the pipeline's
    guidance_rescale does. The U-Net runs in its own dtype; x and c may be float32 leaves.

    A v-prediction U-Net (SD 2.x: v = alpha eps - sigma x_0, with x_t = alpha x_0 + sigma eps and
    alpha^2 = abar(t)) is guided and rescaled on v, as the pipeline does, and then returns the
    epsilon it implies, eps = alpha v + sigma x_t: every sampler of epsilon models runs on it, and
    at fractional model times (the adjoints) abar(t) is interpolated as the samplers do
    (`train_alpha_bar`: the training noise table, given for a v model only)."""

    def __init__(
        self,
        unet: nn.Module,
        uncond: Tensor,
        guidance: float,
        rescale: float = 0.0,
        train_alpha_bar: Tensor | None = None,
        added: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.unet, self.guidance, self.rescale = unet, guidance, rescale
        self.register_buffer("uncond", uncond.detach().clone())
        self.register_buffer("train_alpha_bar", None if train_alpha_bar is None else train_alpha_bar.clone())
        # SDXL's added conditioning: the pooled text embedding of each sample and of the negative
        # prompt, and the size and crop ids (text_embeds, text_embeds_uncond, time_ids)
        self.has_added = added is not None
        for name in ("text_embeds", "text_embeds_uncond", "time_ids"):
            self.register_buffer(name, None if added is None else added[name].detach().clone())

    def _added(self, batch: int, guided: bool, dtype: torch.dtype) -> dict:
        if not self.has_added:
            return {}
        pooled = self.text_embeds.to(dtype).expand(batch, -1)
        if guided:
            pooled = torch.cat([self.text_embeds_uncond.to(dtype).expand(batch, -1), pooled])
        time_ids = self.time_ids.to(dtype).expand(pooled.shape[0], -1)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        dtype = self.unet.dtype
        cond = cond.to(dtype).expand(x.shape[0], *cond.shape[-2:]) if cond.shape[0] == 1 else cond.to(dtype)
        if self.guidance == 1.0:
            guided = self.unet(
                x.to(dtype), t, encoder_hidden_states=cond, **self._added(x.shape[0], False, dtype)
            ).sample.to(x.dtype)
        else:
            uncond = self.uncond.to(dtype).expand_as(cond)
            both = self.unet(
                torch.cat([x, x]).to(dtype),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([uncond, cond]),
                **self._added(x.shape[0], True, dtype),
            ).sample.to(x.dtype)
            out_uncond, out_cond = both.chunk(2)
            guided = out_uncond + self.guidance * (out_cond - out_uncond)
            guided = rescale_guided(guided, out_cond, self.rescale) if self.rescale > 0 else guided
        if self.train_alpha_bar is None:
            return guided
        alpha_bar = alpha_bar_at_time(t.reshape(-1), self.train_alpha_bar).to(x.dtype)
        alpha_bar = alpha_bar.expand(x.shape[0]).reshape(-1, *[1] * (x.dim() - 1))
        return alpha_bar.sqrt() * guided + (1 - alpha_bar).sqrt() * x


def rescale_guided(guided: Tensor, eps_cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4,
    eqs. 15-16): scale the guided prediction to the conditional one's standard deviation, per
    sample over all other dimensions, then mix phi of that with 1 - phi of the guided one."""
    dims = tuple(range(1, guided.ndim))
    matched = guided * (eps_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * matched + (1 - phi) * guided


class StableDiffusion(Task):
    name = "sd"
    summary = "Stable Diffusion-class latent diffusion from a local diffusers folder (tiny: random, offline)"
    version = "1"
    learning_rates = {"latent": 0.05, "cond": 0.01, "noise": 0.05, "weights": 1e-3, GATES: 0.1}
    targets = (*TARGETS, GATES)
    gated_path: tuple[str, ...] = ("unet",)  # where the gated network sits in the guided denoiser
    gate_time_scale = 1.0  # the network's timestep per model time
    dtype = torch.float32  # the estimators' runs: the leaves (the option `dtype` is network_dtype)
    components: tuple[str, ...] = COMPONENTS  # the pipeline folder's subfolders
    networks: tuple[str, ...] = ("unet", "vae", "text_encoder")  # those with a config and weights
    tiny: tuple[str, ...] = tuple(TINY)  # the `model` names of the random pipelines built offline
    pipeline_class = "StableDiffusionPipeline"  # whose lora_state_dict reads a student LoRA
    options = (
        Option(
            "model",
            str,
            "tiny",
            "pipeline folder, cached model id, or tiny / tiny-v (random, built offline: epsilon and v-prediction)",
        ),
        Option(
            "prompt",
            str,
            None,
            "one prompt for every sample, as the pipeline's prompt; `prompt=` (empty) is "
            'the unconditional prompt ""; no commas or brackets (use prompts= for those); unset (None): '
            "prompts=",
            metavar="text",
        ),
        Option(
            "prompts",
            str,
            "",
            "file with one prompt per line, blank lines skipped (default: four built-in "
            "prompts); for the empty prompt use prompt=",
        ),
        Option(
            "negative_prompt",
            str,
            "",
            "the pipeline's negative_prompt: what the unguided half of "
            "classifier-free guidance is conditioned on (empty: the unconditional prompt); no commas or "
            "brackets (use negative_prompt_file= for those)",
        ),
        Option("negative_prompt_file", str, "", "file whose whole text (stripped) is the negative prompt"),
        Option("guidance", float, 7.5, "classifier-free guidance scale (1: none)", check=_guidance),
        Option(
            "guidance_rescale",
            float,
            0.0,
            "the pipeline's guidance_rescale phi: the guided noise "
            "prediction rescaled to the conditional one's std, mixed phi : 1 - phi with the unrescaled one "
            "(Lin et al. 2023, eq. 16; 0: off)",
            check=_rescale,
        ),
        Option(
            "resolution",
            int,
            0,
            "image size in pixels, a multiple of the VAE's downsampling factor (8 for "
            "SD; 0: the U-Net's sample size times it)",
            check=at_least(0),
        ),
        Option("batch", int, 2, "samples per problem (prompts cycle over them)", check=at_least(1)),
        Option("dtype", str, "fp32", "precision of the frozen networks (leaves stay fp32)", choices=tuple(DTYPES)),
        Option(
            "eta",
            float,
            0.0,
            "injected noise: DDIM's eta, or flow-sde's noise level (0: deterministic)",
            check=at_least(0.0),
        ),
        sampler_option(),
        Option(
            "tune",
            str,
            "lora",
            "weights target: LoRA on the U-Net's attention, or all U-Net weights",
            choices=("lora", "full"),
        ),
        Option("lora_rank", int, 4, "LoRA rank", check=at_least(1)),
        Option(
            "checkpoint_blocks",
            bool,
            False,
            "activation checkpointing inside the denoiser, per block (diffusers' gradient checkpointing, as "
            "the field's trainers run it): each call keeps its blocks' inputs and recomputes a block in the "
            "backward; the same gradient, less memory, more time",
        ),
        REWARDS.option(
            rewards.IMAGE,
            "clip",
            "clip, pickscore, aesthetic, lpips, jpeg, jpeg-incompressibility, any other reward of images "
            "(python -m bench list: an entry point's name), or module:function / file.py:function",
        ),
        Option("reward_text", str, "a beautiful photograph", "the text the clip reward compares with"),
        Option(
            "clip_model", str, "tiny", "CLIPModel folder for the clip and aesthetic rewards (tiny: random, offline)"
        ),
        Option("aesthetic_head", str, "tiny", "LAION aesthetic MLP state dict for reward=aesthetic (tiny: random)"),
        Option("lpips_backbone", str, "", "torchvision AlexNet state dict file for reward=lpips"),
        Option("reference_image", str, "", "the image reward=lpips pulls towards (PNG, JPEG...)"),
        Option(
            "reference",
            str,
            "auto",
            "exact gradient: float64 backprop, checkpointed backprop in the task's "
            "dtype (task), or off; auto: float64 for tiny, else task",
            choices=("auto", "float64", "task", "off"),
        ),
        *gating.gate_options(),
        Option(
            "student",
            str,
            "",
            "shortcut-model's few-step student of the denoiser: a folder python -m tasks.shortcut wrote, a "
            "diffusers-format LoRA (a .safetensors file, or a folder with pytorch_lora_weights.safetensors: "
            "LCM, TCD, Hyper-SD, PCM), or a distilled checkpoint of the same architecture (a folder with "
            "unet/ or transformer/); empty: none",
        ),
        Option(
            "student_steps",
            int,
            0,
            "the student's step count K (0: from its student.json; required for a LoRA or a checkpoint)",
            check=at_least(0),
        ),
        Option(
            "student_bound",
            float,
            STUDENT_BOUND,
            "the largest trajectory error a student may have, as a fraction of the undistilled K-step "
            "chain's (that chain is at 1): from each problem's x_N, the largest RMS(student state - N-step "
            "chain state) / RMS(N-step chain state) over the student's states at noise levels the N-step "
            "chain visits (x_0 always); past it the cell is skipped",
            check=_positive,
        ),
    )

    def __init__(self, **values) -> None:
        super().__init__(**values)
        # Configurable sets every option as an attribute of its name: the option `dtype` (the frozen
        # networks' precision, a name in DTYPES) would shadow Task.dtype, the torch dtype of the
        # estimators' runs (the leaves', float32 here). It lives on as network_dtype.
        self.network_dtype = DTYPES[self.__dict__.pop("dtype")]

    @property
    def reference_dtype(self) -> torch.dtype | None:
        choice = self.reference if self.reference != "auto" else ("float64" if self.model in self.tiny else "task")
        return {"float64": torch.float64, "task": torch.float32, "off": None}[choice]

    @property
    def reference_checkpointed(self) -> bool:
        return self.reference_dtype is not torch.float64

    def preflight(self) -> None:
        self._checked = True
        self.folder = self.model_folder()
        missing = [name for name in self.components if not (self.folder / name).is_dir()]
        if missing:
            raise SpecError(
                f"{self.name}[model={self.model}]: {self.folder} is not a diffusers pipeline folder "
                f"(no {', '.join(n + '/' for n in missing)}); valid: a folder save_pretrained wrote"
            )
        owner = f"{self.name}[model={self.model}]"
        configs = {name: read_component(self.folder, name, owner) for name in self.networks}
        self.latent_shape = self._latent_shape(configs)
        self._check_text_width(configs)
        self.prompt_list = self._read_prompts()
        self.negative_text = self._read_negative_prompt()
        self._check_guidance_options()
        config = read_json_object(self.folder / "scheduler" / "scheduler_config.json", owner)
        train = config.get("num_train_timesteps", 1000)
        if not _is_count(train):
            raise SpecError(f"{owner}: scheduler_config.json: num_train_timesteps={train!r} is not a positive integer")
        self.train_timesteps, self.pipeline_scheduler = train, config
        super().preflight()  # the sampler against the model
        try:  # the sampler's diffusers scheduler on this configuration: bad values fail here, not in set-up
            self.chosen_sampler().scheduler(config)
        except SpecError:
            raise
        except Exception as exc:
            raise SpecError(
                f"{owner}: scheduler_config.json does not make a scheduler ({rewards.first_line(exc)})"
            ) from None
        try:  # and the sampler's schedule on it: what the sampler cannot reproduce (ddim with
            self.make_schedule(1)  # clip_sample true, say) is refused here, before anything runs
        except SpecError as exc:
            raise SpecError(f"{owner}: {self.folder / 'scheduler' / 'scheduler_config.json'}: {exc}") from None
        REWARDS.preflight(self.reward, self, rewards.IMAGE)  # its files, or a user function that loads
        self._student = self.read_student("unet", configs["unet"])

    def model_folder(self) -> Path:
        return resolve_model(self.model)

    @property
    def model_prediction(self) -> str:
        prediction = (
            self.pipeline_scheduler.get("prediction_type", "epsilon")
            if hasattr(self, "pipeline_scheduler")
            else "epsilon"
        )
        if prediction not in PREDICTIONS:
            raise SpecError(
                f"{self.name}[model={self.model}]: prediction_type={prediction!r} is not supported; valid: "
                "epsilon (SD 1.x-class pipelines), v_prediction (SD 2.x)"
            )
        return "epsilon"  # a v model's denoiser returns the epsilon it implies (GuidedUNet)

    @property
    def predicts_v(self) -> bool:
        self._check_once()
        return self.pipeline_scheduler.get("prediction_type", "epsilon") == "v_prediction"

    def scheduler_config(self) -> dict:
        """The pipeline's scheduler configuration (its noise table, spacing and offsets): every
        sampler is built on it, as a pipeline's `from_config` swap of schedulers does; for the
        epsilon that the denoiser returns (GuidedUNet converts a v model's output)."""
        self._check_once()
        return {**self.pipeline_scheduler, "prediction_type": "epsilon"}

    def _read_prompts(self) -> list[str]:
        if self.prompt is not None:
            if self.prompts:
                raise SpecError("sd: give prompt= (one prompt) or prompts= (a file), not both")
            return [self.prompt]
        if not self.prompts:
            return list(PROMPTS)
        owner = f"sd[prompts={self.prompts}]"
        text = read_text_file(Path(self.prompts).expanduser(), owner, "one prompt per line")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise SpecError(f"{owner}: the file holds no prompt (one per line; for the empty prompt use prompt=)")
        return lines

    def _read_negative_prompt(self) -> str:
        if not self.negative_prompt_file:
            return self.negative_prompt
        if self.negative_prompt:
            raise SpecError("sd: give negative_prompt= or negative_prompt_file=, not both")
        owner = f"sd[negative_prompt_file={self.negative_prompt_file}]"
        return read_text_file(Path(self.negative_prompt_file).expanduser(), owner, "the negative prompt").strip()

    def _check_guidance_options(self) -> None:
        """The pipeline ignores a negative prompt and guidance_rescale without guidance: refuse them."""
        if self.guidance == 1.0:
            for name, given in (
                ("guidance_rescale", self.guidance_rescale > 0),
                ("negative_prompt", bool(self.negative_text)),
            ):
                if given:
                    raise SpecError(
                        f"sd: {name} acts on classifier-free guidance, which guidance=1 turns off; "
                        "set guidance > 1 (7.5 by default)"
                    )

    def _latent_shape(self, configs: dict[str, dict]) -> tuple[int, int, int]:
        """(channels, side, side) of the latents for the `resolution` option, checked against the
        VAE's downsampling factor (the pipeline's vae_scale_factor) and the U-Net's."""
        unet, vae, owner = configs["unet"], configs["vae"], f"{self.name}[model={self.model}]"
        if unet["in_channels"] != vae["latent_channels"]:
            raise SpecError(
                f"{owner}: the U-Net takes {unet['in_channels']} input channels but the VAE's latents "
                f"have {vae['latent_channels']} (an inpainting or image-conditioned U-Net); valid: a "
                "text-to-image pipeline"
            )
        vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
        unet_scale = 2 ** (len(unet["block_out_channels"]) - 1)
        size, which = self.resolution, f"sd[resolution={self.resolution}]"
        if not size:
            sample = unet["sample_size"]
            sides = set(sample) if isinstance(sample, list) else {sample}
            if len(sides) != 1:
                raise SpecError(f"{owner}: the U-Net's sample_size {sample} is not square; set resolution=")
            size = sides.pop() * vae_scale
            which = f"{owner}: the resolution {size} from the U-Net's sample_size"
        smallest = vae_scale * unet_scale  # below it the U-Net's coarsest feature map has no pixel
        if size % vae_scale or size < smallest:
            raise SpecError(
                f"{which}: must be a multiple of {vae_scale} (the VAE's downsampling) "
                f"and at least {smallest} (the U-Net's {unet_scale}x downsampling of the latents); "
                f"e.g. {max(smallest, size - size % vae_scale)}"
            )
        return (unet["in_channels"], size // vae_scale, size // vae_scale)

    def _check_text_width(self, configs: dict[str, dict]) -> None:
        width, attention = configs["text_encoder"]["hidden_size"], configs["unet"]["cross_attention_dim"]
        if isinstance(attention, int) and attention != width:
            raise SpecError(
                f"{self.name}[model={self.model}]: the U-Net attends to {attention}-wide text embeddings but the "
                f"text encoder gives {width}-wide ones; valid: a pipeline whose parts belong together"
            )

    def read_student(self, network: str, config: dict) -> StudentSource | None:
        """The `student` option's student, checked against the task's denoising network (the
        pipeline folder `network` with configuration `config`); None without one."""
        if not self.student:
            if self.student_steps:
                raise SpecError(f"{self.name}[student_steps={self.student_steps}]: no student; set student=PATH")
            return None
        owner = f"{self.name}[student={self.student}]"
        return read_source(self.student, self.student_steps, owner, self.pipeline_class, network, config)

    def _student_applies(self) -> bool:
        """A student follows the deterministic chain it was distilled on: eta 0."""
        return bool(self.student) and self.eta == 0

    def attach_student(self, problem: Problem) -> None:
        """shortcut-model's K-step chain of the student on the problem's denoiser, and the bound of
        its trajectory error, where the student applies."""
        if not self._student_applies():
            return
        source = self._student

        def chain(steps: int) -> Chain:
            delta = source.delta(denoising_network(problem.chain.denoiser)[1])
            return student_chain(problem, delta, self.make_schedule(steps), source.owner)

        problem.extras[FEW_STEP_CHAIN] = functools.cache(chain)
        problem.extras[FEW_STEP_BOUND] = self.student_bound

    def offers(self) -> dict[str, object]:
        """shortcut-model's student: the step count of the `student` option's."""
        self._check_once()
        return {FEW_STEP_CHAIN: [self._student.steps] if self._student else []}

    def _check_once(self) -> None:
        """preflight, unless done (resolve() runs it; fingerprint and set-up need its results)."""
        if not getattr(self, "_checked", False):
            self.preflight()

    def code_objects(self) -> tuple:
        """The sampler, and a reward given by name (module:function, file.py:function, an entry
        point): its code is in the cells' keys like the task's own."""
        return super().code_objects() + REWARDS.code_objects(self.reward, rewards.IMAGE)

    def data_fingerprint(self) -> str:
        self._check_once()
        if not (self.prompts or self.negative_prompt_file):
            fingerprint = _fingerprint(self.folder)
        else:  # the texts of the prompt files too: an edited file must not reuse the old rows
            texts = json.dumps([self.prompt_list, self.negative_text]).encode()
            fingerprint = hashlib.sha256(_fingerprint(self.folder).encode() + texts).hexdigest()[:16]
        if not self.student:
            return fingerprint
        return hashlib.sha256(f"{fingerprint}+{self._student.fingerprint()}".encode()).hexdigest()[:16]

    def setup(self, device: torch.device) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        super().setup(device)
        quiet_loading()
        self._check_once()
        dtype, folder = self.network_dtype, self.folder
        load = dict(local_files_only=True)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **load).to(device, dtype)
        self.unet.eval().requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **load).to(device, dtype)
        self.vae.eval().requires_grad_(False)
        self.encode_prompts()
        self._reward = REWARDS.build(self.reward, self, rewards.IMAGE)
        # the training noise table abar_t of the pipeline's scheduler (a v model's conversion)
        self.train_alpha_bar = DDIMScheduler.from_config(self.pipeline_scheduler).alphas_cumprod.double()
        self._copies: dict[torch.dtype, tuple[nn.Module, object]] = {}

    def encode_prompts(self) -> None:
        """prompt_embeds (one per prompt) and uncond_embeds (the negative prompt's, the empty
        prompt's without one), computed once; the text encoder is released afterwards."""
        from transformers import CLIPTextModel, CLIPTokenizer

        load = dict(local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(self.folder, subfolder="tokenizer", **load)
        text_encoder = CLIPTextModel.from_pretrained(self.folder, subfolder="text_encoder", **load).to(self.device)
        self.prompt_embeds = self.encode(tokenizer, text_encoder, self.prompt_list)
        self.uncond_embeds = self.encode(tokenizer, text_encoder, [self.negative_text])  # "" without one

    @torch.no_grad()
    def encode(self, tokenizer, text_encoder, prompts: list[str]) -> Tensor:
        """The pipeline's prompt embedding: padded to the tokenizer's max length, last hidden state."""
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return text_encoder(ids)[0].float()

    def _networks(self, dtype: torch.dtype):
        """The VAE and reward in `dtype` for float64 references (cached), else the loaded ones."""
        if dtype in (torch.float32, self.network_dtype):
            return self.vae, self._reward
        if dtype not in self._copies:
            vae = copy.deepcopy(self.vae).to(dtype)
            reward = self._reward
            if isinstance(reward, rewards.NetworkReward):
                reward = reward.to(dtype)
            self._copies[dtype] = (vae, reward)
        return self._copies[dtype]

    def decode(self, latents: Tensor, vae: nn.Module) -> Tensor:
        """Images in [0, 1] from latents (the pipeline's decode and postprocessing)."""
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.to(latents.dtype) / 2 + 0.5).clamp(0, 1)

    def trainable_copy(self, network: nn.Module, target: str, seed: int, dtype: torch.dtype, lora_targets) -> nn.Module:
        """A fresh copy of the denoiser network for one problem: in float64 for a float64 problem,
        its blocks checkpointed with checkpoint_blocks, and for the weights target a LoRA on
        `lora_targets` (drawn from the seed, its parameters float32 or float64) or every weight."""
        network = copy.deepcopy(network)
        if dtype == torch.float64:
            network = network.to(dtype)
        if self.checkpoint_blocks:
            network.enable_gradient_checkpointing()
        if target != "weights":
            return network
        if self.tune == "full":
            return network.requires_grad_(True)
        from peft import LoraConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network.add_adapter(
                LoraConfig(
                    r=self.lora_rank,
                    lora_alpha=self.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(lora_targets),
                )
            )
        for param in network.parameters():
            if param.requires_grad:
                param.data = param.data.to(dtype if dtype == torch.float64 else torch.float32)
        return network

    def added_conditioning(self, order: list[int], dtype: torch.dtype) -> dict[str, Tensor] | None:
        """What the U-Net reads beside the text embedding (SDXL's pooled embedding and size ids); none for SD 1.x and 2.x."""
        return None

    def check_point(self, target: str, steps: int) -> None:
        if target == GATES and steps < 2:
            raise SpecError(
                f"target 'gates' needs N >= 2 steps, got {steps}: step N computes every block, so "
                "at N = 1 there is nothing to gate"
            )
        if target == GATES and self.checkpoint_blocks:
            raise SpecError(
                f"{self.spec}: target 'gates' skips blocks that checkpoint_blocks would recompute; "
                "leave checkpoint_blocks off for the gates"
            )

    def gate_problem(self, steps: int, seed: int, dtype: torch.dtype | None) -> Problem:
        """DiP-GO's search (bench/gating.py) on the frozen denoiser's blocks: gate logits per
        (step, block), the consistency reward and the sparsity penalty."""
        self.check_point(GATES, steps)
        problem = self.make_problem("latent", steps, seed, dtype)
        return gating.search(self, problem, self.gated_path, seed, time_scale=self.gate_time_scale)

    @torch.no_grad()
    def evaluate(self, problem: Problem, x0: Tensor) -> dict[str, float]:
        """The reward of the samples; on the gates target the searched gates deployed (closed
        blocks skipped) from `batch` fresh latents against the static baselines: speed-up over the
        unpruned sampler, the task's reward and the distance to the unpruned samples."""
        if problem.target != GATES:
            return super().evaluate(problem, x0)
        generator = torch.Generator().manual_seed(10_000)
        fresh = torch.randn(x0.shape, generator=generator).to(x0)
        noises = (
            None
            if problem.noises is None
            else [torch.randn(x0.shape, generator=generator).to(x0) for _ in problem.noises]
        )
        vae, reward = self._networks(x0.dtype)

        def quality(samples: Tensor, unpruned: Tensor) -> dict[str, float]:
            return {
                "reward": float(reward(self.decode(samples, vae)).mean()),
                "consistency_mse": float(((samples - unpruned) ** 2).mean()),
            }

        key = (*sorted((k, v) for k, v in self.values.items() if not k.startswith("gate_")), problem.num_steps)
        deployed = gating.evaluate_search(
            problem,
            self.__dict__.setdefault("_static_results", {}),  # the baselines, once per point
            key,
            chain=problem.chain,
            path=self.gated_path,
            network=gating.ungated(problem, self.gated_path),
            fresh=fresh,
            cond=problem.cond,
            noises=noises,
            quality=quality,
            device=self.device,
            threads=torch.get_num_threads(),
            time_scale=self.gate_time_scale,
        )
        return {"reward": float(problem.reward_fn(x0).mean()), **deployed}

    def make_problem(self, target: str, steps: int, seed: int, dtype: torch.dtype | None = None) -> Problem:
        self.check_target(target)
        if target == GATES:
            return self.gate_problem(steps, seed, dtype)
        dtype = dtype or self.dtype  # the leaves' precision (the `dtype` option is the networks')
        unet = self.trainable_copy(self.unet, target, seed, dtype, LORA_TARGETS)
        order = [b % len(self.prompt_list) for b in range(self.batch)]
        denoiser = GuidedUNet(
            unet,
            self.uncond_embeds.to(dtype),
            self.guidance,
            self.guidance_rescale,
            self.train_alpha_bar.to(self.device, dtype) if self.predicts_v else None,
            self.added_conditioning(order, dtype),
        )
        generator = torch.Generator().manual_seed(seed)
        x_start = torch.randn(self.batch, *self.latent_shape, generator=generator).to(self.device, dtype)
        noises = None
        if self.eta > 0:
            noises = [
                torch.randn(self.batch, *self.latent_shape, generator=generator).to(self.device, dtype)
                for _ in range(steps)
            ]
        cond = self.prompt_embeds[order].clone().to(self.device, dtype)
        leaves = self.leaves_for(target, x_start, cond, noises, denoiser)
        schedule = self.make_schedule(steps)
        vae, reward = self._networks(dtype)

        def reward_of(x0: Tensor) -> Tensor:
            return reward(self.decode(x0, vae))

        problem = Problem(
            chain=Chain(denoiser, schedule),
            x_start=x_start,
            cond=cond,
            noises=noises,
            reward_fn=reward_of,
            target=target,
            leaves=leaves,
        )
        self.attach_student(problem)
        return problem

    @torch.no_grad()
    def images(self, problem: Problem, x0: Tensor) -> Tensor:
        return self.decode(x0.float(), self.vae)
