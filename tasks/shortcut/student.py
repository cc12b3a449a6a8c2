"""The student: the problem's own guided denoiser called with each distilled weight w + delta in
place of w. The delta is keyed by the denoising network's own parameter names (those of the
`UNet2DConditionModel` or the transformer, as its state dict and from_pretrained name them), so one
delta serves every copy of the network a task makes: in float64 for a reference, with a reward
LoRA (peft keeps the weight as `base_layer`), or with all weights trainable. The leaves of the
long model (its LoRA, its weights, the conditioning, x_N) stay leaves of the student's output."""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

from bench.chain import Chain, Schedule
from bench.errors import SpecError

HOLDERS = ("unet", "transformer")  # the attributes a guided denoiser keeps its network under


def denoising_network(denoiser: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, network): the diffusers model inside a guided denoiser and the prefix of its
    parameters' names there: GuidedUNet.unet (sd, sdxl), GuidedTransformer.transformer (sd3),
    digits' GuidedDenoiser.unet, which for the transformer model is a ClassTransformer holding
    `.transformer`."""
    from diffusers import ModelMixin

    prefix, module = "", denoiser
    while not isinstance(module, ModelMixin):
        name = next((n for n in HOLDERS if isinstance(getattr(module, n, None), nn.Module)), None)
        if name is None:
            raise TypeError(f"{type(denoiser).__name__} holds no diffusers network under .unet or .transformer")
        prefix, module = f"{prefix}{name}.", getattr(module, name)
    return prefix, module


def plain_name(name: str) -> str:
    """A parameter's name as the bare network has it (peft's LoRA keeps the weight as base_layer)."""
    return name.replace(".base_layer", "")


def plain_parameters(denoiser: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """The network's parameters by plain name, each with its full name in `denoiser`."""
    prefix, _ = denoising_network(denoiser)
    return {
        plain_name(name.removeprefix(prefix)): (name, param)
        for name, param in denoiser.named_parameters()
        if name.startswith(prefix)
    }


def check_shapes(delta: dict[str, tuple[int, ...]], network: dict[str, tuple[int, ...]], owner: str) -> None:
    """SpecError unless every weight the delta names is one of the network's, with its shape."""
    unknown = [name for name in delta if name not in network]
    if unknown:
        raise SpecError(
            f"{owner}: {len(unknown)} of its {len(delta)} weights are not in this network (e.g. {unknown[0]}); "
            "valid: a student of the task's own architecture"
        )
    wrong = [name for name in delta if tuple(delta[name]) != tuple(network[name])]
    if wrong:
        name = wrong[0]
        raise SpecError(
            f"{owner}: {len(wrong)} of its weights have other shapes than the network's (e.g. {name}: "
            f"{tuple(delta[name])} against {tuple(network[name])}); valid: a student of the task's own architecture"
        )


class Student(nn.Module):
    """denoiser(x, t, c) with every weight w the delta names replaced by w + delta."""

    def __init__(self, denoiser: nn.Module, delta: dict[str, Tensor], owner: str = "the student") -> None:
        super().__init__()
        self.denoiser = denoiser
        params = plain_parameters(denoiser)
        check_shapes({k: v.shape for k, v in delta.items()}, {k: p.shape for k, (_, p) in params.items()}, owner)
        self.delta = {}
        for plain, value in delta.items():
            name, param = params[plain]
            self.delta[name] = value.to(device=param.device, dtype=param.dtype)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        params = dict(self.denoiser.named_parameters())
        shifted = {name: params[name] + d for name, d in self.delta.items()}  # a leaf stays a leaf's function
        return functional_call(self.denoiser, shifted, (x, t, cond), strict=False)


def student_chain(problem, delta: dict[str, Tensor], schedule: Schedule, owner: str = "the student") -> Chain:
    """The student's chain on `schedule`, built on the problem's denoiser, its calls counted with the problem's."""
    return Chain(Student(problem.chain.denoiser, delta, owner), schedule, counter=problem.chain.counter)
