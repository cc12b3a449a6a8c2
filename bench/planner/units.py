"""The units of the cost model, counted on an architecture built under fake tensors: nothing is
allocated and no weights are needed, so a 12-billion-parameter transformer is counted on a CPU in
seconds.

- A: the bytes autograd keeps for one denoiser call with its graph, counted once per storage,
  without the parameters' and buffers' own storages (autograd saves frozen weights too; they are
  resident anyway and counted as weights);
- W: the working memory of one call without a graph, the peak of its ops' outputs alive at once
  (a lower bound: a kernel's internal buffers are not seen);
- S: one latent state;
- F, V in FLOPs: one forward, and what its backward adds (torch.utils.flop_counter);
- the same for one VAE decode, and the parameters of both.

What autograd keeps depends on what requires a gradient, so A is counted per kind of target:
`input` (the latent or the conditioning: activations needed for the input's gradient only),
`lora` (low-rank adapters of rank r on the attention projections, the latent requiring grad as it
does inside a chain), `full` (every weight). Attention is counted as torch's scaled-dot-product
kernel on this device keeps it; `attention_kernel` in the result names what was kept (a fused
kernel keeps the output and a log-sum-exp per query, the math kernel the attention matrix)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.planner.models import Architecture

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class Units:
    """Counted on one architecture at one shape and dtype (per denoiser call: the batch that goes
    through the denoiser, doubled by classifier-free guidance)."""

    params: int  # the denoiser's own parameters (adapters not included)
    param_bytes: int
    trainable: int  # parameters that get a gradient for this kind of target (a LoRA's: the adapters)
    activations: int  # A, bytes
    activations_checkpointed: int  # A with every block checkpointed: block inputs + the largest block
    working: int  # W, the peak of a call's op outputs alive at once without a graph
    state: int  # S, bytes of one latent state (the sampler's batch, not doubled)
    flops_forward: float  # F
    flops_backward: float  # what a VJP adds to a forward
    vae_param_bytes: int
    vae_activations: int  # bytes kept by one decode with its graph (input requiring grad)
    vae_flops_forward: float
    vae_flops_backward: float
    attention_kernel: str


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update x A^T B^T (B starts at zero)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Replace every nn.Linear whose name ends in one of `targets` by a LoRALinear."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in targets):
                setattr(module, child_name, LoRALinear(child, rank))


def _storage_key(t: torch.Tensor):
    return StorageWeakRef(t.untyped_storage())


class Allocations(TorchDispatchMode):
    """The storages the ops run inside it allocate (an output whose storage is none of its inputs'),
    and the peak of their bytes alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[StorageWeakRef, int] = {}
        self.live: dict[StorageWeakRef, int] = {}
        self.alive = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _dense(t)}
        for key in [k for k in self.live if k.expired()]:
            self.alive -= self.live.pop(key)
        for t in tree_leaves(out):
            if _dense(t):
                key = StorageWeakRef(t.untyped_storage())
                if key not in inputs and key not in self.created:
                    size = t.untyped_storage().nbytes()
                    self.created[key] = size
                    self.live[key] = size
                    self.alive += size
        self.peak = max(self.peak, self.alive)
        return out


def _dense(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


class SavedBytes:
    """Bytes of the storages autograd saves inside the context, each counted once, less the
    excluded (parameter) storages; attributed to the block running when it was saved."""

    def __init__(self, exclude: set) -> None:
        self.exclude = exclude
        self.seen: dict = {}
        self.block: str | None = None
        self.by_block: dict[str, int] = {}
        self.largest_saved: tuple[int, ...] = ()

    def pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self.exclude and key not in self.seen:
            size = t.untyped_storage().nbytes()
            self.seen[key] = size
            if self.block is not None:
                self.by_block[self.block] = self.by_block.get(self.block, 0) + size
            if t.dim() >= 3 and math.prod(t.shape) > math.prod(self.largest_saved or (0,)):
                self.largest_saved = tuple(t.shape)
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield


def working_bytes(fn) -> int:
    """W: the peak bytes fn()'s ops hold alive at once, without a graph."""
    with torch.no_grad(), Allocations() as allocations:
        fn()
    return allocations.peak


def blocks_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks a trainer checkpoints: a U-Net's down, mid and up blocks, a transformer's blocks."""
    found = []
    for attr in ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(model, attr, None) or ()):
            found.append((f"{attr}.{i}", block))
    if getattr(model, "mid_block", None) is not None:
        found.append(("mid_block", model.mid_block))
    return found


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a fake model cannot be cast after it is built
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _flops(fn) -> tuple[float, object]:
    """(FLOPs of fn(), its result)."""
    from bench.measure.flops import flop_counter

    with flop_counter() as counter:
        result = fn()
    return float(counter.get_total_flops()), result


def denoiser_inputs(arch: Architecture, batch: int, resolution: int, dtype: torch.dtype) -> dict:
    """The keyword inputs of one denoiser call at this batch and resolution."""
    h = w = resolution // arch.vae_scale
    c = arch.latent_channels
    d = arch.denoiser
    t = torch.full((batch,), 500.0)
    if arch.family in ("unet", "unet-xl"):
        inputs = {
            "sample": torch.randn(batch, c, h, w, dtype=dtype),
            "timestep": t,
            "encoder_hidden_states": torch.randn(
                batch, arch.text_tokens, d.get("cross_attention_dim", 768), dtype=dtype
            ),
        }
        if arch.family == "unet-xl":
            time_dim = d.get("addition_time_embed_dim", 256)
            pooled = d.get("projection_class_embeddings_input_dim", 2816) - 6 * time_dim
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, dtype=dtype),
                "time_ids": torch.randn(batch, 6, dtype=dtype),
            }
        return inputs
    if arch.family == "sd3":
        return {
            "hidden_states": torch.randn(batch, d.get("in_channels", 16), h, w, dtype=dtype),
            "encoder_hidden_states": torch.randn(
                batch, arch.text_tokens, d.get("joint_attention_dim", 4096), dtype=dtype
            ),
            "pooled_projections": torch.randn(batch, d.get("pooled_projection_dim", 2048), dtype=dtype),
            "timestep": t,
        }
    # flux: 2x2 patches of the latent packed into tokens, position ids for image and text tokens
    tokens = (h // 2) * (w // 2)
    inputs = {
        "hidden_states": torch.randn(batch, tokens, d.get("in_channels", 64), dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, arch.text_tokens, d.get("joint_attention_dim", 4096), dtype=dtype),
        "pooled_projections": torch.randn(batch, d.get("pooled_projection_dim", 768), dtype=dtype),
        "timestep": t / 1000,
        "img_ids": torch.zeros(tokens, 3, dtype=dtype),
        "txt_ids": torch.zeros(arch.text_tokens, 3, dtype=dtype),
    }
    if d.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def _input_tensor(arch: Architecture, inputs: dict) -> torch.Tensor:
    return inputs["sample"] if "sample" in inputs else inputs["hidden_states"]


def _build_denoiser(arch: Architecture) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, arch.denoiser_class)
    return cls.from_config({**arch.denoiser, **arch.denoiser_overrides})


def count_module(build, inputs_of, kind: str, rank: int, input_of, decode: bool = False, fake: bool = True) -> dict:
    """Count one call of the module `build()` on `inputs_of()` under fake tensors: saved bytes with
    and without block checkpointing, forward and backward FLOPs, parameters. `input_of(inputs)` is
    the tensor that requires grad (the latent); `decode`: call the module's decode (a VAE); `fake`:
    False counts on real tensors instead (what the tests compare the fake count with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() if fake else contextlib.nullcontext():
        model = build()
        model.requires_grad_(kind == "full")
        params = sum(p.numel() for p in model.parameters())  # the model's own, before any adapter
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if kind == "lora":
            add_lora(model, rank)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        exclude = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}

        def call():
            inputs = inputs_of()
            input_of(inputs).requires_grad_(True)
            out = model.decode(**inputs) if decode else model(**inputs)
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            return inputs, out

        saved = SavedBytes(exclude)
        block_inputs: dict = {}  # what a checkpointed block keeps: its tensor inputs, once per storage

        def enter(name):
            def hook(module, args, kwargs):
                saved.block = name
                for x in tree_leaves((args, kwargs)):
                    if isinstance(x, torch.Tensor):
                        block_inputs.setdefault(_storage_key(x), x.untyped_storage().nbytes())

            return hook

        hooks = []
        for name, block in blocks_of(model):
            hooks.append(block.register_forward_pre_hook(enter(name), with_kwargs=True))
            hooks.append(block.register_forward_hook(lambda m, a, o: setattr(saved, "block", None)))
        with saved.counting():
            forward, (inputs, out) = _flops(call)
        for hook in hooks:
            hook.remove()
        leaves = [input_of(inputs)] + [p for p in model.parameters() if p.requires_grad]
        backward, _ = _flops(lambda: torch.autograd.grad(out, leaves, grad_outputs=torch.ones_like(out)))
        working = working_bytes(lambda: (model.decode if decode else model)(**inputs_of()))
    outside = saved.total - sum(saved.by_block.values())
    kept_inputs = sum(size for key, size in block_inputs.items() if key not in exclude)
    return {
        "params": params,
        "param_bytes": param_bytes,
        "trainable": trainable,
        "activations": saved.total,
        # checkpointed blocks keep their inputs and, during the backward, one block's activations
        # at a time, recomputed
        "activations_checkpointed": outside + kept_inputs + max(saved.by_block.values(), default=0),
        "working": working,
        "flops_forward": forward,
        "flops_backward": backward,
        "largest_saved": saved.largest_saved,
    }


def attention_kernel(largest_saved: tuple[int, ...], tokens: int) -> str:
    """A saved tensor whose last two dimensions are both the token count is an attention matrix."""
    if len(largest_saved) >= 2 and largest_saved[-1] == largest_saved[-2] and largest_saved[-1] >= tokens > 16:
        return "math (the attention matrix is kept)"
    return "fused (output and log-sum-exp kept)"


def units(arch: Architecture, resolution: int, batch: int, dtype: str, kind: str, rank: int = 32) -> Units:
    """The units of `arch` at this resolution and dtype, for the batch the sampler carries (the
    denoiser sees twice that under classifier-free guidance)."""
    import diffusers

    torch_dtype = DTYPES[dtype]
    calls = batch * (2 if arch.guidance == "cfg" else 1)
    with default_dtype(torch_dtype):
        denoiser = count_module(
            lambda: _build_denoiser(arch),
            lambda: denoiser_inputs(arch, calls, resolution, torch_dtype),
            kind,
            rank,
            lambda inputs: _input_tensor(arch, inputs),
        )
        h = resolution // arch.vae_scale
        vae = count_module(
            lambda: diffusers.AutoencoderKL.from_config(arch.vae),
            lambda: {"z": torch.randn(batch, arch.latent_channels, h, h, dtype=torch_dtype)},
            "input",
            rank,
            lambda inputs: inputs["z"],
            decode=True,
        )
    tokens = (h // 2) ** 2 if arch.family in ("sd3", "flux") else h * h
    element = torch.tensor([], dtype=torch_dtype).element_size()
    return Units(
        params=denoiser["params"],
        param_bytes=denoiser["param_bytes"],
        trainable=denoiser["trainable"],
        activations=denoiser["activations"],
        activations_checkpointed=denoiser["activations_checkpointed"],
        working=denoiser["working"],
        state=batch * arch.latent_channels * h * h * element,
        flops_forward=denoiser["flops_forward"],
        flops_backward=denoiser["flops_backward"],
        vae_param_bytes=vae["param_bytes"],
        vae_activations=vae["activations"],
        vae_flops_forward=vae["flops_forward"],
        vae_flops_backward=vae["flops_backward"],
        attention_kernel=attention_kernel(denoiser["largest_saved"], tokens),
    )
