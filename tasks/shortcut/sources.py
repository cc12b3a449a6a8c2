"""Where a student comes from: the `student` option's path, read in one of three forms.

- distilled: a folder `python -m tasks.shortcut` wrote, student.safetensors (the delta, by the
  network's parameter names) and student.json (its record: K, the teacher's steps, the sampler,
  guidance, training settings, the check's result);
- lora: a diffusers-format LoRA of the denoising network (a .safetensors file, or a folder holding
  pytorch_lora_weights.safetensors), made dense (tasks/shortcut/lora.py);
- checkpoint: a distilled network of the same architecture (a folder with unet/ or transformer/,
  or one with config.json and the weights), delta = student - teacher.

`read_source` is the preflight: the form, K, and that the student fits the task's network (its
weights' names and shapes, or the checkpoint's configuration), without loading any network's
weights; `StudentSource.delta` loads the delta when the first problem needs it."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from bench.errors import SpecError
from tasks.cache import add_file
from tasks.shortcut import lora
from tasks.shortcut.student import check_shapes, plain_name

DELTA, RECORD = "student.safetensors", "student.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
FORMS = "a folder python -m tasks.shortcut wrote (student.json), a LoRA (.safetensors), or a checkpoint folder"


@dataclass
class StudentSource:
    """A student found at `path`: its form, its step count K, its record (distilled form only) and
    the files it reads."""

    path: Path
    form: str  # distilled, lora, checkpoint
    steps: int
    record: dict
    files: list[Path]
    owner: str
    _lora: tuple | None = field(default=None, repr=False)  # the LoRA read at preflight
    _delta: dict[str, Tensor] | None = field(default=None, repr=False)

    def fingerprint(self) -> str:
        """Size and first and last MiB of each file it reads: a replaced student changes it."""
        digest = hashlib.sha256()
        for file in self.files:
            add_file(digest, file, file.name)
        return digest.hexdigest()[:16]

    def delta(self, teacher: nn.Module) -> dict[str, Tensor]:
        """The weight delta by plain parameter name, on the CPU, loaded once; `teacher` is
        the task's network (for a checkpoint: delta = student - teacher)."""
        if self._delta is None:
            if self.form == "distilled":
                self._delta = load_file(self.files[0])  # float16 as written; the student casts it
            elif self.form == "lora":
                self._delta = lora.lora_delta(*self._lora, self.owner)
            else:
                self._delta = checkpoint_delta(self.files[0].parent, teacher, self.owner)
        return self._delta


def read_source(path_text: str, steps: int, owner: str, pipeline: str, network: str, config: dict) -> StudentSource:
    """The student at `path_text` for a task whose pipeline class is `pipeline` and whose denoising
    network is the folder `network` (unet, transformer) with configuration `config`; `steps` is the
    student_steps option (0: from the record). One-line SpecErrors for everything that is wrong."""
    path = Path(path_text).expanduser()
    if not path.exists():
        raise SpecError(f"{owner}: no such file or folder; valid: {FORMS}")
    shapes = network_shapes(config, network)
    if path.is_dir() and (path / RECORD).exists():
        return _distilled(path, steps, owner, shapes)
    file = lora.lora_file(path)
    if file is not None:
        steps = _required(steps, owner, "a LoRA")
        state, settings = lora.read_lora(file, pipeline, network, owner, config)
        dense = {}
        for key, value in state.items():
            module, _, part = key.partition(".lora_")
            if part == "A.weight":
                up = state.get(f"{module}.lora_B.weight")
                dense[f"{module}.weight"] = (up.shape[0] if up is not None else -1, *value.shape[1:])
            elif part == "B.bias":
                dense[f"{module}.bias"] = tuple(value.shape)
        check_shapes(dense, shapes, f"{owner} (a LoRA)")
        return StudentSource(path, "lora", steps, {}, [file], owner, (state, settings))
    folder = path / network if (path / network / "config.json").is_file() else path
    if path.is_dir() and (folder / "config.json").is_file():
        steps = _required(steps, owner, "a checkpoint")
        _check_architecture(folder, network, config, owner)
        weights = next((folder / name for name in WEIGHTS if (folder / name).is_file()), None)
        if weights is None:
            raise SpecError(f"{owner}: no weights in {folder} (expected {WEIGHTS[0]} or {WEIGHTS[1]})")
        files = [folder / "config.json", weights]
        return StudentSource(path, "checkpoint", steps, {}, files, owner)
    raise SpecError(f"{owner}: not a student; valid: {FORMS} (with {network}/ or config.json)")


def _required(steps: int, owner: str, what: str) -> int:
    if steps < 1:
        raise SpecError(f"{owner}: {what} does not say its step count; set student_steps=K (e.g. 4)")
    return steps


def _distilled(folder: Path, steps: int, owner: str, shapes: dict[str, tuple[int, ...]]) -> StudentSource:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"{owner}: {RECORD} is not readable JSON ({lora.first_line(exc)})") from None
    recorded = record.get("steps") if isinstance(record, dict) else None
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 1:
        raise SpecError(f"{owner}: {RECORD} has no step count (steps: a positive integer)")
    if steps and steps != recorded:
        raise SpecError(f"{owner}: student_steps={steps}, but the student was distilled for {recorded} steps")
    try:
        with safe_open(folder / DELTA, framework="pt") as handle:
            delta = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:
        raise SpecError(f"{owner}: {DELTA} is not a readable safetensors file ({lora.first_line(exc)})") from None
    check_shapes(delta, shapes, f"{owner} (a distilled delta)")
    return StudentSource(folder, "distilled", recorded, record, [folder / DELTA, folder / RECORD], owner)


def network_class(config: dict, network: str) -> type:
    """The diffusers class of a network's configuration (its _class_name)."""
    import diffusers

    default = "UNet2DConditionModel" if network == "unet" else "SD3Transformer2DModel"
    return getattr(diffusers, config.get("_class_name", default))


def network_shapes(config: dict, network: str) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, from a network built on the meta device: no weights read."""
    with torch.device("meta"):
        model = network_class(config, network).from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def architecture(cls: type, config: dict) -> dict:
    """The constructor arguments a configuration gives `cls`, defaults filled in (lists as tuples)."""
    parameters = inspect.signature(cls.__init__).parameters
    values = {
        name: config.get(name, p.default)
        for name, p in parameters.items()
        if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    }
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _check_architecture(folder: Path, network: str, config: dict, owner: str) -> None:
    try:
        theirs = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SpecError(f"{owner}: {folder / 'config.json'} is not readable JSON ({lora.first_line(exc)})") from None
    ours_cls, theirs_cls = network_class(config, network), network_class(theirs, network)
    if ours_cls is not theirs_cls:
        raise SpecError(f"{owner}: a {theirs_cls.__name__}, the task's network is a {ours_cls.__name__}")
    ours, theirs = architecture(ours_cls, config), architecture(ours_cls, theirs)
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        shown = "; ".join(f"{k}={theirs[k]!r} (the task's: {ours[k]!r})" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise SpecError(f"{owner}: another architecture than the task's {network}: {shown}{more}")


def checkpoint_delta(folder: Path, teacher: nn.Module, owner: str) -> dict[str, Tensor]:
    """student - teacher for every weight, by plain name (the weights where they differ)."""
    student = type(teacher).from_pretrained(folder, local_files_only=True)
    theirs = dict(student.named_parameters())
    ours = {plain_name(name): p for name, p in teacher.named_parameters() if ".lora_" not in name}
    check_shapes({k: v.shape for k, v in theirs.items()}, {k: v.shape for k, v in ours.items()}, owner)
    delta = {}
    for name, value in theirs.items():
        difference = value.detach().float().cpu() - ours[name].detach().float().cpu()
        if difference.any():
            delta[name] = difference.contiguous()
    return delta
