"""Sweeps as data: `python -m bench run --config SWEEP.toml`.

A sweep file holds what the run command's flags hold, under the same names (`timing_cap` or
`timing-cap`; lists as TOML arrays or comma-separated strings), plus an optional `[launcher]`
table and optional `[[part]]` tables:

    out = "results/reference/digits-scaling"
    tasks = ["digits"]
    targets = ["weights"]

    [[part]]                          # each part is a sweep: the settings above plus its own
    steps = [10, 20, 50, 100]
    estimators = ["full", "checkpoint", "adjoint"]

    [[part]]
    steps = [10, 20]
    estimators = ["edict", "draft-lv"]

    [launcher]                        # where the cells run (bench/run/launch.py)
    name = "slurm"
    partition = "gpu"

Precedence, lowest first: the settings' defaults (bench/run/settings.py, where each is declared), the file's
top level, a part, then the flags given on the command line (they apply to every part). Paths in
the file (`out`, `include`) are relative to the current directory, like the flags'."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bench.run import settings
from bench.errors import SpecError
from bench.run.launch import LaunchSpec
from bench.run.settings import Context, Setting, SweepSpec

LAUNCH_FIELDS = {f.name: f for f in fields(LaunchSpec)}
RUN_KEYS = {"out"}  # not a cell's identity, not a launcher option


def spec_defaults() -> Any:
    """The sweep settings nothing overrides (SweepSpec's defaults, bench/run/settings.py)."""
    return settings.spec_class()()


@dataclass
class Sweep:
    """One invocation: its parts (each a SweepSpec), the run folder, and where the cells run."""

    parts: list[SweepSpec]
    out: Path | None
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    source: str | None = None  # the sweep file, if any


def _unknown(where: str, key: str, valid: list[str]) -> SpecError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return SpecError(f"{where}: unknown key {key!r}; {hint}valid: {', '.join(sorted(valid))}")


def coerce(name: str, value: Any, where: str) -> Any:
    """A sweep setting (SweepSpec's field `name`) from a file or a flag, converted by its kind."""
    return settings.convert(name, value, where)


def check_baseline(spec: SweepSpec, where: str) -> None:
    """An explicit baseline must be one of the sweep's estimators: the time ratios are taken to it,
    timed side by side at every point. (The default, full, when the sweep does not run it: no ratios.)"""
    from bench.registry import ESTIMATORS, include

    if not spec.estimators:
        return  # refused as empty when the sweep is resolved
    for path in spec.includes:  # a plug-in baseline
        include(path)
    baseline = ESTIMATORS.create(spec.baseline).spec
    estimators = list(dict.fromkeys(ESTIMATORS.create(name).spec for name in spec.estimators))
    if baseline not in estimators:
        raise SpecError(
            f"{where} {spec.baseline} is not among the sweep's estimators ({', '.join(estimators)}); "
            "the time ratios are taken to an estimator the sweep runs: give one of them, or add it"
        )


def _sweep_settings(table: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SweepSpec fields, run keys) of one table of a sweep file; anything else is refused."""
    spec, run = {}, {}
    valid = [s.key for s in settings.SETTINGS] + sorted(RUN_KEYS)
    for key, value in table.items():
        setting = settings.lookup(key)
        name = key.replace("-", "_")
        if setting is not None:
            spec[setting.name] = coerce(setting.name, value, where)
        elif name in RUN_KEYS:
            if not isinstance(value, str) or not value.strip():
                raise SpecError(f"{where}: {name} must be a folder name, got {value!r}")
            run[name] = value
        else:
            raise _unknown(where, key, valid + ["part", "launcher"])
    return spec, run


def launch_settings(table: Any, where: str) -> dict[str, Any]:
    """The [launcher] table: `name` (the launcher) and LaunchSpec's options."""
    if not isinstance(table, dict):
        raise SpecError(f"{where}: [launcher] must be a table, got {table!r}")
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        name = "launcher" if name == "name" else name
        if name not in LAUNCH_FIELDS:
            raise _unknown(f"{where} [launcher]", key, ["name"] + [k for k in LAUNCH_FIELDS if k != "launcher"])
        out[name] = value
    return out


def read_file(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(shared settings, parts, run keys, launcher settings) of a sweep file."""
    path = Path(path)
    try:
        is_file = path.is_file()
    except OSError:  # a name too long for the filesystem
        is_file = False
    if not is_file:
        raise SpecError(f"--config {path}: no such file; give a sweep file (TOML, see docs/sweeps.md)")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8-sig"))  # a byte-order mark is valid UTF-8
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"--config {path}: not valid TOML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise SpecError(f"--config {path}: arrays or tables nested too deeply to read") from None
    except OSError as exc:
        raise SpecError(f"--config {path}: cannot be read ({exc.strerror or exc})") from None
    parts_table = data.pop("part", [{}])
    launcher = launch_settings(data.pop("launcher", {}), str(path))
    shared, run = _sweep_settings(data, str(path))
    if not isinstance(parts_table, list) or not all(isinstance(p, dict) for p in parts_table) or not parts_table:
        raise SpecError(f"{path}: 'part' must be an array of tables ([[part]]), each a sweep's own settings")
    parts = []
    for number, table in enumerate(parts_table, 1):
        spec, extra = _sweep_settings(table, f"{path} part {number}")
        if extra:
            raise SpecError(f"{path} part {number}: {', '.join(extra)} belongs at the top level (one per file)")
        parts.append(spec)
    return shared, parts, run, launcher


def build(config: Path | None, flags: dict[str, Any], launch_flags: dict[str, Any], out: Path | None) -> Sweep:
    """The sweep of an invocation. `flags` and `launch_flags` hold only the flags given on the
    command line (already named as SweepSpec's and LaunchSpec's fields)."""
    shared, parts, run, launcher = read_file(config) if config else ({}, [{}], {}, {})
    launch = LaunchSpec.build({**launcher, **launch_flags})
    specs = []
    for number, part in enumerate(parts, 1):
        given = {**shared, **part, **flags}
        spec = replace(spec_defaults(), **given)

        def origin(setting: Setting) -> str:
            """Where a setting came from, to name it in an error: the flag, or the file (and part)."""
            if setting.name in flags or setting.name not in given:
                return setting.flag
            return f"{config}{f' part {number}' if len(parts) > 1 else ''}: {setting.key}"

        settings.check_spec(spec, origin, Context(launch.launcher))
        if "baseline" in given:
            check_baseline(spec, origin(settings.lookup("baseline")))
        specs.append(spec)
    folder = out if out is not None else (Path(run["out"]) if "out" in run else None)
    return Sweep(specs, folder, launch, str(config) if config else None)
