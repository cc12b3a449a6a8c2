"""F and V in seconds on the present device (`bench plan --measure`): the denoiser and the VAE built
from their configs with random weights on the device (real tensors: the weights must fit), timed
as the suite times its own units (bench/measure/timing.py: one forward without graph, F; one
forward with graph and its backward into the latent and the trainable parameters, F + V;
synchronised, after a warm-up, the median of interleaved rounds)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from bench.errors import SpecError
from bench.planner.models import Architecture
from bench.planner.units import DTYPES, _build_denoiser, add_lora, default_dtype, denoiser_inputs


@dataclass(frozen=True)
class MeasuredUnits:
    device: str
    forward: float  # F, seconds
    backward: float  # V: what the backward adds to a forward with graph
    vae_forward: float
    vae_backward: float
    rounds: int


def present_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_dtype(dtype: str, device: torch.device) -> None:
    """A dtype the device cannot run is refused before anything is built."""
    if device.type == "cuda" and DTYPES[dtype] is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise SpecError(f"--dtype {dtype}: {name} cannot run bfloat16; give fp16 or fp32")


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _unit_calls(model, inputs_of, input_of, decode: bool):
    def run(grad: bool):
        inputs = inputs_of()
        x = input_of(inputs)
        if grad:
            x.requires_grad_(True)
        with torch.set_grad_enabled(grad):
            out = model.decode(**inputs) if decode else model(**inputs)
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        if grad:
            leaves = [x] + [p for p in model.parameters() if p.requires_grad]
            torch.autograd.grad(out, leaves, grad_outputs=torch.ones_like(out))

    return {"F": lambda: run(False), "F+V": lambda: run(True)}


def _time(calls, device: torch.device, rounds: int) -> tuple[float, float]:
    from bench.measure.timing import time_interleaved

    results = time_interleaved(calls, device, rounds=rounds, threads=torch.get_num_threads(), warmup=1)
    for record in results.values():
        if record.error is not None:
            raise record.error
    f, fv = (statistics.median(results[name].clean or results[name].seconds) for name in ("F", "F+V"))
    return f, max(0.0, fv - f)


def measure_units(
    arch: Architecture,
    resolution: int,
    batch: int,
    dtype: str,
    kind: str,
    rank: int,
    device: torch.device,
    rounds: int = 3,
) -> MeasuredUnits:
    """F and V of the denoiser (at the batch it sees: doubled by classifier-free guidance) and of
    the VAE decode, in seconds on `device`."""
    import diffusers

    torch_dtype = DTYPES[dtype]
    calls_batch = batch * (2 if arch.guidance == "cfg" else 1)
    h = resolution // arch.vae_scale
    with default_dtype(torch_dtype):
        model = _build_denoiser(arch).to(device)
        model.requires_grad_(kind == "full")
        if kind == "lora":
            add_lora(model, rank)
            model.to(device)
        inputs = _move(denoiser_inputs(arch, calls_batch, resolution, torch_dtype), device)
        latent = "sample" if "sample" in inputs else "hidden_states"
        f, v = _time(
            _unit_calls(
                model,
                lambda: {**inputs, latent: inputs[latent].detach().clone()},
                lambda inputs: inputs[latent],
                decode=False,
            ),
            device,
            rounds,
        )
        del model
        vae = diffusers.AutoencoderKL.from_config(arch.vae).to(device).requires_grad_(False)
        z = torch.randn(batch, arch.latent_channels, h, h, dtype=torch_dtype, device=device)
        vae_f, vae_v = _time(
            _unit_calls(
                vae,
                lambda: {"z": z.detach().clone()},
                lambda inputs: inputs["z"],
                decode=True,
            ),
            device,
            rounds,
        )
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"this CPU ({torch.get_num_threads()} threads)"
    )
    return MeasuredUnits(name, f, v, vae_f, vae_v, rounds)
