"""The run command's settings, declared once. Each `Setting` is one field of a sweep: its name (the
SweepSpec field), the sweep file's key and the flag (`--name-with-dashes` unless it says
otherwise), its kind, default, help and check. Everything else is generated from SETTINGS: the
SweepSpec dataclass, the run command's flags (`add_flags`), a sweep file's keys and the conversion
of their values (`lookup`, `convert`), the per-setting checks (`check_spec`, the one place they
are applied) and the table of run options in docs/cli.md (`readme_table`; `python -m bench.cli.docs` rewrites it,
a test keeps the two equal).

A check takes the value (already of the setting's kind) and a `Context` and returns an error
text or None; `{setting}` in the text stands for where the value came from: the flag, or the
sweep file and key (a text without it is prefixed with it). Checks across settings (the baseline
among the sweep's estimators, CUDA being there, --memory process on a CPU) are the plan's."""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable

from bench.errors import SpecError
from bench.run.memory import MODES as MEMORY_MODES
from bench.options import split_list

DEFAULT_TASK = "digits"
DEFAULT_ESTIMATORS = "full,checkpoint,adjoint,sdo,truncated[k=2]"
DEFAULT_STEPS = (10, 20)
DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_STABLE_CAP_S = 300.0  # timing seconds per point when --stable is given without --timing-cap
MAX_SEED = 2**63 - 1
MAX_SECONDS = 365 * 24 * 3600.0  # a larger finite limit overflows the platform's clocks and timers
MAX_SLURM_THREADS = 512
ISOLATE_MODES = {
    "auto": "cell on CUDA, none on a CPU",
    "cell": "each cell in a freshly spawned process (own allocator; a hung kernel is killed)",
    "none": "every cell in the sweep's process",
}


# -- kinds: how a value is written on the command line and in a file, and read ---------------


@dataclass(frozen=True, eq=False)
class Kind:
    """`convert(value, key)` turns a flag's or a file's value into the field's, raising
    ValueError with the reason; `argtype` is argparse's type for the flag (None: the string)."""

    name: str  # the documentation's type column
    annotation: str  # the SweepSpec field's type
    convert: Callable[[Any, str], Any]
    argtype: Callable[[str], Any] | None = None
    choices: dict[str, str] | None = None  # name -> what it means
    noun: str = ""  # what a choice is called in a refusal ("memory mode")
    is_list: bool = False


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _seconds(value: Any, key: str) -> float:
    """Seconds: at most MAX_SECONDS when finite (an infinite or negative value is the check's)."""
    value = _number(value, key)
    if math.isfinite(value) and value > MAX_SECONDS:
        raise ValueError(f"{key} must be at most {MAX_SECONDS:.0f} seconds (a year), got {value:g}")
    return value


def _limit(value: Any, key: str) -> float | None:
    """Seconds of a limit; 0 (or none, in code) is no limit."""
    if value is None:
        return None
    value = _seconds(value, key)
    return None if value == 0 else value


def _list_of(item: type) -> Callable[[Any, str], list]:
    what = "integers" if item is int else "strings"

    def convert(value: Any, key: str) -> list:
        items = split_list(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{key} must be a list or a comma-separated string, got {value!r}")
        try:
            return [_item(item, one) for one in items]
        except (TypeError, ValueError):
            raise ValueError(f"expected a comma-separated list of {what} (or a TOML array), got {value!r}") from None

    return convert


def _item(kind: type, item: Any) -> Any:
    if kind is int and (isinstance(item, bool) or not isinstance(item, (int, str))):
        raise TypeError(item)
    if kind is str and not isinstance(item, str):
        raise TypeError(item)
    return kind(item.strip() if isinstance(item, str) else item)


STR = Kind("string", "str", _string)
INT = Kind("integer", "int", _integer, int)
FLOAT = Kind("number", "float", _number, float)
BOOL = Kind("true or false", "bool", _boolean)
SECONDS = Kind("seconds", "float", _seconds, float)
LIMIT = Kind("seconds (0: none)", "float | None", _limit, float)
STRS = Kind("list of strings", "list[str]", _list_of(str), is_list=True)
INTS = Kind("list of integers", "list[int]", _list_of(int), is_list=True)


def choice(choices: dict[str, str], noun: str) -> Kind:
    """A string among `choices` (name -> what it means); any other is refused as an unknown `noun`."""
    return Kind("one of " + ", ".join(choices), "str", _string, choices=choices, noun=noun)


# -- checks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a check may need beside the value: where the cells run (None: not known, as for a
    SweepSpec built in code; the limits that depend on it are then not applied)."""

    launcher: str | None = None


Check = Callable[[Any, Context], "str | None"]


def at_least(low: int) -> Check:
    return lambda value, context: None if value >= low else f"{{setting}} must be >= {low}, got {value}"


def nonempty_each(each: Check | None = None) -> Check:
    """A list with at least one item, each passing `each`."""

    def check(values: list, context: Context) -> str | None:
        if not values:
            return "{setting} is empty; give at least one"
        for value in values if each else ():
            error = each(value, context)
            if error:
                return error
        return None

    return check


def _step_count(steps: Any, context: Context) -> str | None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        return f"step count must be a positive integer, got {steps}"
    return None


def _seed(seed: Any, context: Context) -> str | None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        return f"seed {seed} is out of range; valid: 0..{MAX_SEED} (torch generators take 64 bits)"
    return None


def _seconds_limit(value: float | None, context: Context) -> str | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        return f"{{setting}} must be a finite number of seconds >= 0 (0: no limit), got {value}"
    return None


def _fraction(value: float, context: Context) -> str | None:
    if not (math.isfinite(value) and 0 <= value < 1):
        return f"{{setting}} must be a fraction in [0, 1) (IQR / median; 0: off), got {value}"
    return None


def _device(value: str, context: Context) -> str | None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        return f"unknown device {value!r}; valid: cpu, cuda, cuda:N"
    return None


def _memory_limit(value: str, context: Context) -> str | None:
    from bench.run.fit import MEMORY_LIMITS, parse_limit

    try:
        parse_limit(value)
    except SpecError:
        return f"{{setting}} {value!r}: give {MEMORY_LIMITS}"
    return None


def threads_limit(launcher: str) -> tuple[int, str]:
    """The most intra-op threads a sweep may ask for, and what that limit is: this machine's cores
    where the cells run here (more threads than cores only wait for each other), MAX_SLURM_THREADS
    on SLURM (the nodes' cores are not known here)."""
    if launcher == "slurm":
        return MAX_SLURM_THREADS, f"{MAX_SLURM_THREADS}, the most this suite lets a SLURM job ask for"
    cores = os.cpu_count() or 1
    return cores, f"{cores}, this machine's cores (os.cpu_count())"


def _threads(value: int, context: Context) -> str | None:
    if value < 0:
        return f"{{setting}} must be >= 0, got {value}"
    if context.launcher is not None:
        limit, what = threads_limit(context.launcher)
        if value > limit:
            return f"{{setting}} {value} is more threads than {what}; give at most {limit} (0: the default)"
    return None


# -- the settings -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Setting:
    name: str  # the SweepSpec field
    kind: Kind
    default: Any
    help: str
    check: Check | None = None
    key: str = ""  # the sweep file's key ("": the name)
    flag: str = ""  # the run command's flag ("": --key with dashes; a switch for true or false)
    metavar: str | None = None
    repeat: bool = False  # the flag may be given more than once, each adding an item
    switches: tuple[tuple[str, Any, str], ...] = ()  # (flag, the value it sets, help): aliases

    def __post_init__(self) -> None:
        key = self.key or self.name
        object.__setattr__(self, "key", key)
        if not self.flag:
            dashed = key.replace("_", "-")
            flag = (f"--no-{dashed}" if self.default else f"--{dashed}") if self.kind is BOOL else f"--{dashed}"
            object.__setattr__(self, "flag", flag)

    def flags(self) -> list[str]:
        return [self.flag, *(flag for flag, _, _ in self.switches)]

    def refusal(self, value: Any, subject: str, context: Context) -> str | None:
        """Why `value` cannot be this setting (named `subject`), or None."""
        try:
            self.kind.convert(value, self.key)  # a value set in code has the kind's type too
        except ValueError as exc:
            return f"{subject}: {exc}"
        error = None
        if self.kind.choices is not None and value not in self.kind.choices:
            error = f"unknown {self.kind.noun} {value!r}; valid: {', '.join(self.kind.choices)}"
        if error is None and self.check is not None:
            error = self.check(value, context)
        if error is None:
            return None
        return error.replace("{setting}", subject) if "{setting}" in error else f"{subject}: {error}"

    def meaning(self) -> str:
        """The help, with the choices' meanings."""
        if self.kind.choices is None:
            return self.help
        return f"{self.help}: " + "; ".join(f"{k}: {v}" for k, v in self.kind.choices.items())


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "tasks", STRS, [DEFAULT_TASK], "comma-separated task specs name[k=v,...]", nonempty_each(), metavar="SPEC,..."
    ),
    Setting(
        "estimators",
        STRS,
        split_list(DEFAULT_ESTIMATORS),
        "comma-separated estimator specs name[k=v,...]",
        nonempty_each(),
        metavar="SPEC,...",
    ),
    Setting(
        "targets",
        STRS,
        ["latent", "cond", "weights"],
        "what is optimised: latent, cond, weights, noise (needs eta > 0), gates (DiP-GO's block gates: digits, sd, sdxl, sd3, flux)",
        nonempty_each(),
        metavar="NAME,...",
    ),
    Setting("steps", INTS, list(DEFAULT_STEPS), "sampler step counts N", nonempty_each(_step_count), metavar="N,..."),
    Setting(
        "seeds",
        INTS,
        [0],
        "seeds of the problems and the estimators' draws, each in 0..2^63-1",
        nonempty_each(_seed),
        metavar="SEED,...",
    ),
    Setting(
        "iters", INT, 4, "Adam iterations of the short optimisation (at most, with --budget)", at_least(0), metavar="N"
    ),
    Setting(
        "warmup",
        INT,
        1,
        "untimed calls of each cell right before its timed rounds (the untimed gradient-agreement call runs earlier)",
        at_least(0),
        metavar="N",
    ),
    Setting(
        "rounds",
        INT,
        3,
        "clean timed rounds per cell at least (rounds slowed by other load are left out and repeated)",
        at_least(1),
        metavar="N",
    ),
    Setting(
        "memory",
        choice(MEMORY_MODES, "memory mode"),
        "auto",
        "peak-memory measurement",
        metavar="MODE",
        switches=(("--no-memory", "off", "same as --memory off"),),
    ),
    Setting(
        "memory_limit",
        STR,
        "auto",
        "skip a cell whose predicted footprint (resident tensors, gradient, the estimator's peak from "
        "its cost model and units counted on the problem) exceeds it, with the prediction as the "
        "reason: auto (the device's free memory), off, or a size such as 24GiB or 80GB",
        _memory_limit,
        metavar="SIZE",
    ),
    Setting(
        "timeout",
        LIMIT,
        DEFAULT_TIMEOUT_S,
        "limit per cell, over all its phases; a cell over it is recorded as 'timeout' (0: none)",
        _seconds_limit,
        metavar="SECONDS",
    ),
    Setting("device", STR, "cpu", "cpu, cuda or cuda:N", _device, metavar="DEVICE"),
    Setting(
        "includes",
        STRS,
        [],
        "import a file that registers estimators or tasks (repeatable; paths relative to the current directory)",
        key="include",
        metavar="FILE.py",
        repeat=True,
    ),
    Setting(
        "isolate",
        choice(ISOLATE_MODES, "isolation"),
        "auto",
        "process per cell (an isolated cell has its "
        "own allocator and CUDA counters, and one stuck in a kernel that the timer cannot interrupt is "
        "killed at --timeout + 60 s; isolated cells are not interleaved)",
        metavar="MODE",
    ),
    Setting(
        "threads",
        INT,
        0,
        "torch intra-op threads (0: 1 on a CPU, which a busy core cannot slow, see "
        f"Timing; torch's default on CUDA); at most this machine's cores ({MAX_SLURM_THREADS} with "
        "--launcher slurm)",
        _threads,
        metavar="N",
    ),
    Setting(
        "interleave",
        BOOL,
        True,
        "time the cells of a point round-robin with the other estimators' (true), or "
        "each cell on its own (false, --no-interleave)",
    ),
    Setting(
        "baseline",
        STR,
        "full",
        "the estimator time ratios (with bootstrap intervals) are taken to, one of "
        "the sweep's estimators (the default when the sweep does not run it: no ratios)",
        metavar="SPEC",
    ),
    Setting(
        "stable",
        FLOAT,
        0.0,
        "keep timing until each cell's IQR is within FRACTION of its median, e.g. "
        f"0.05 (0: off; capped by --timing-cap, {DEFAULT_STABLE_CAP_S:g} s per point then)",
        _fraction,
        metavar="FRACTION",
    ),
    Setting(
        "timing_cap",
        SECONDS,
        0.0,
        f"stop timing a point after SECONDS (0: no cap, {DEFAULT_STABLE_CAP_S:g} s with --stable)",
        _seconds_limit,
        metavar="SECONDS",
    ),
    Setting(
        "budget",
        SECONDS,
        0.0,
        "optimisation seconds per cell (gradients and Adam steps; --iters caps; 0: "
        "--iters alone): equal-compute comparisons; in the cell's key when given",
        _seconds_limit,
        metavar="SECONDS",
    ),
)


def lookup(key: str, table: tuple[Setting, ...] | None = None) -> Setting | None:
    """The setting a sweep file's key (or a field name) names, dashes or underscores."""
    key = key.replace("-", "_")
    for setting in SETTINGS if table is None else table:
        if key in (setting.key, setting.name):
            return setting
    return None


def convert(name: str, value: Any, where: str) -> Any:
    """The value of the setting `name` (a field) from a flag or a file, converted by its kind."""
    setting = lookup(name)
    try:
        return setting.kind.convert(value, setting.key)
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from None


def check_spec(spec: Any, subject: Callable[[Setting], str] | None = None, context: Context = Context()) -> None:
    """Apply every setting's check to a sweep part; `subject(setting)` names where a value came
    from (default: the flag). The first refusal is a SpecError."""
    names = set(getattr(spec, "__dataclass_fields__", {}))
    for setting in SETTINGS:
        if setting.name in names:
            error = setting.refusal(getattr(spec, setting.name), (subject or _flag)(setting), context)
            if error:
                raise SpecError(error)


def _flag(setting: Setting) -> str:
    return setting.flag


# -- SweepSpec ---------------------------------------------------------------------------------

_CLASSES: dict[int, tuple[tuple[Setting, ...], type]] = {}


def spec_class(table: tuple[Setting, ...] | None = None) -> type:
    """The dataclass of a sweep part: one field per setting, in the table's order, with its default."""
    table = SETTINGS if table is None else table
    cached = _CLASSES.get(id(table))
    if cached is not None and cached[0] is table:
        return cached[1]
    fields = []
    for setting in table:
        default = setting.default
        if isinstance(default, (list, dict, set)):
            fields.append(
                (
                    setting.name,
                    setting.kind.annotation,
                    field(default_factory=lambda default=default: copy.deepcopy(default)),
                )
            )
        else:
            fields.append((setting.name, setting.kind.annotation, field(default=default)))
    cls = make_dataclass(
        "SweepSpec", fields, namespace={"__doc__": "The settings of one sweep part (bench/run/settings.py)."}
    )
    cls.__module__ = __name__
    _CLASSES[id(table)] = (table, cls)
    return cls


SweepSpec = spec_class(SETTINGS)


# -- the command line and the documentation ----------------------------------------------------


def show(value: Any) -> str:
    """A default as it is written on the command line."""
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The run command's flags of every setting. Each defaults to None (not given): a sweep's
    settings come from the defaults, then --config's file, then the flags given."""
    for setting in SETTINGS:
        text = f"{setting.meaning()} (default: {show(setting.default)})".replace("%", "%%")
        if setting.kind is BOOL:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                action="store_const",
                const=not setting.default,
                default=None,
                help=text,
            )
        else:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                type=setting.kind.argtype,
                action="append" if setting.repeat else "store",
                default=None,
                metavar=setting.metavar,
                help=text,
            )
        for flag, value, help_text in setting.switches:
            parser.add_argument(
                flag,
                dest=setting.name,
                action="store_const",
                const=value,
                default=None,
                help=help_text.replace("%", "%%"),
            )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def readme_table() -> str:
    """The run options as a Markdown table: flag, sweep-file key, type, default, meaning."""
    lines = ["| flag | sweep-file key | type | default | meaning |", "|---|---|---|---|---|"]
    for setting in SETTINGS:
        flag = f"`{setting.flag}{f' {setting.metavar}' if setting.metavar and setting.kind is not BOOL else ''}`"
        flags = ", ".join([flag, *(f"`{f}` (= {show(v)})" for f, v, _ in setting.switches)])
        if setting.repeat:
            flags += " (repeatable)"
        lines.append(
            f"| {flags} | `{setting.key}` | {setting.kind.name} | `{show(setting.default)}` | "
            f"{_cell(setting.meaning())} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.run.settings: the table docs/cli.md shows (bench/cli/docs.py)
    print(readme_table())
