"""A diffusers-format LoRA (what LCM, TCD, Hyper-SD and PCM LoRAs ship) as a dense weight delta.

The file is read by the pipeline class's own `lora_state_dict`, which turns the kohya / A1111 key
formats into diffusers' own; the keys are then put in peft's form (lora_A, lora_B) and each
module's scale found as diffusers and peft find it when they load the LoRA: alpha / r from the
adapter metadata saved with the file, else from the network alphas of a kohya file, else 1. The
delta of a module is scale * B A (a convolution's A flattened over its kernel, B 1x1), and
scale * b for the bias of a LoRA with `lora_bias`: what `fuse_lora` adds to the weights."""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

from bench.errors import SpecError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes in a folder


def lora_file(path: Path) -> Path | None:
    """The LoRA weights at `path`: a .safetensors file, or a folder holding WEIGHT_NAME."""
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    return None


def read_lora(file: Path, pipeline: str, network: str, owner: str, network_config: dict | None = None):
    """(peft-form state dict of the network's LoRA, its LoraConfig) from the file, through
    `pipeline`'s lora_state_dict; `network` is the pipeline's name of the denoising network (unet,
    transformer). A LoRA of other components (the text encoders) is refused: the student is the
    denoiser alone."""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    cls = getattr(diffusers, pipeline)
    extra = {"unet_config": network_config} if network == "unet" and network_config is not None else {}
    try:
        out = cls.lora_state_dict(
            str(file.parent), weight_name=file.name, local_files_only=True, return_lora_metadata=True, **extra
        )
    except Exception as exc:
        raise SpecError(f"{owner}: not a LoRA {pipeline} reads ({first_line(exc)})") from None
    state, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
    prefix = f"{network}."
    others = sorted({key.split(".")[0] for key in state if not key.startswith(prefix)})
    if others:
        besides = f" besides the {network}" if len(others) < len({key.split(".")[0] for key in state}) else ""
        raise SpecError(
            f"{owner}: the LoRA adapts {', '.join(others)}{besides}; valid: a LoRA of the {network} alone "
            "(the student is the denoiser)"
        )
    state = {key.removeprefix(prefix): value for key, value in state.items()}
    if not state:
        raise SpecError(f"{owner}: the file holds no LoRA weights")
    if not any("lora_A" in key for key in state):
        state = convert_unet_state_dict_to_peft(state)
    if any("lora_magnitude_vector" in key or "dora_scale" in key for key in state):
        raise SpecError(f"{owner}: a DoRA adapter (magnitude vectors); valid: a plain LoRA")
    kwargs = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    if not kwargs:  # no adapter settings saved with the file: ranks from the shapes, alphas if given
        alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.startswith(prefix)}
        rank = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
        kwargs = get_peft_kwargs(rank, alphas or None, state, is_unet=True)
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{owner}: its adapter settings are not peft's ({first_line(exc)})") from None
    return state, config


def lora_delta(state: dict[str, Tensor], config, owner: str) -> dict[str, Tensor]:
    """The dense delta of each adapted weight (and bias) of a peft-form LoRA state dict, float32."""
    from peft.utils.other import get_pattern_key

    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        module, sep, part = key.partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight", "B.bias"):
            raise SpecError(f"{owner}: unexpected LoRA entry {key} (valid: lora_A.weight, lora_B.weight, lora_B.bias)")
        modules.setdefault(module, {})[part] = value.float()
    delta = {}
    for module, parts in modules.items():
        if "A.weight" not in parts or "B.weight" not in parts:
            raise SpecError(f"{owner}: {module} has lora_{'B' if 'A.weight' in parts else 'A'} without its pair")
        down, up = parts["A.weight"], parts["B.weight"]
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        product = up.flatten(1) @ down.flatten(1)  # (out, r) (r, in * kernel)
        delta[f"{module}.weight"] = (scale * product).reshape(up.shape[0], *down.shape[1:]).contiguous()
        if "B.bias" in parts:
            delta[f"{module}.bias"] = scale * parts["B.bias"]
    return delta


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
