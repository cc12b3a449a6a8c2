"""Typed options and the `name[k=v,...]` spec syntax shared by estimators and tasks."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.errors import SpecError

_SPEC = re.compile(r"^\s*([A-Za-z_][\w\-.]*)\s*(?:\[(.*)\])?\s*$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One declared option. `type` is int, float, bool or str; `choices` restricts the value;
    `check(value)` returns an error message or None (for range checks such as k >= 1)."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)
    metavar: str | None = None  # how `list` shows the accepted values, where the type says too little

    def describe(self) -> str:
        kind = self.metavar or ("|".join(map(str, self.choices)) if self.choices else self.type.__name__)
        return f"{self.name}: {kind} = {format_value(self.default)}"

    def parse(self, raw: Any, owner: str) -> Any:
        """Turn a CLI string (or a Python value) into a checked value of this option's type."""
        value = raw
        if isinstance(raw, str) and self.type is not str:
            text = raw.strip().lower()
            try:
                if self.type is bool:
                    if text not in _TRUE | _FALSE:
                        raise ValueError
                    value = text in _TRUE
                elif self.type is int:
                    value = int(text)
                elif self.type is float:
                    value = float(text)
            except ValueError:
                raise SpecError(
                    f"{owner}: option {self.name}={raw!r} is not a valid {self.type.__name__} ({self.describe()})"
                ) from None
        elif self.type is float and isinstance(raw, int) and not isinstance(raw, bool):
            value = float(raw)
        elif self.type is str and isinstance(raw, int) and not isinstance(raw, bool):
            value = str(raw)  # e.g. a step index, sdo(step=3), for an option that also takes names
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise SpecError(f"{owner}: option {self.name}={raw!r} must be {self.type.__name__} ({self.describe()})")
        if self.type is float and not math.isfinite(value):
            raise SpecError(f"{owner}: option {self.name}={raw!r} must be a finite number ({self.describe()})")
        if self.choices is not None and value not in self.choices:
            raise SpecError(f"{owner}: option {self.name}={raw!r} is not one of {', '.join(map(str, self.choices))}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise SpecError(f"{owner}: option {self.name}={raw!r} {problem}")
        return value


def at_least(low: float, note: str = "") -> Callable[[Any], str | None]:
    """An Option check: the value must be >= low."""
    return lambda value: None if value >= low else f"must be >= {low}{note}"


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """'truncated[k=2,latent_path=true]' -> ('truncated', {'k': '2', 'latent_path': 'true'})."""
    match = _SPEC.match(text)
    if not match:
        raise SpecError(f"cannot read {text!r}: expected name or name[key=value,...]")
    name, body = match.group(1), match.group(2)
    values: dict[str, str] = {}
    for item in split_list(body or ""):  # bracket-aware: toy[sampler=dpmpp2m[order=1],d=3]
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"cannot read option {item!r} in {text!r}: expected key=value")
        if key.strip() in values:
            raise SpecError(f"option {key.strip()!r} given twice in {text!r}")
        values[key.strip()] = value.strip()
    return name, values


def split_list(text: str) -> list[str]:
    """Split 'a,b[k=1,j=2],c' on the commas that are not inside brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    items = [item.strip() for item in items if item.strip()]
    if depth != 0:
        raise SpecError(f"unbalanced brackets in {text!r}")
    return items


def resolve_options(owner: str, declared: tuple[Option, ...], given: dict[str, Any]) -> dict[str, Any]:
    """Check `given` against `declared`; return every option with defaults filled in."""
    by_name = {opt.name: opt for opt in declared}
    for key in given:
        if key not in by_name:
            valid = ", ".join(opt.describe() for opt in declared) or "none"
            hint = difflib.get_close_matches(key, list(by_name), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SpecError(f"{owner}: unknown option {key!r}{did_you_mean}; valid options: {valid}")
    return {name: (opt.parse(given[name], owner) if name in given else opt.default) for name, opt in by_name.items()}


def canonical_spec(name: str, declared: tuple[Option, ...], values: dict[str, Any]) -> str:
    """The readable identity used in the CLI, result columns and cache keys: only non-defaults."""
    parts = [f"{opt.name}={format_value(values[opt.name])}" for opt in declared if values[opt.name] != opt.default]
    return f"{name}[{','.join(parts)}]" if parts else name


class Configurable:
    """Something built from `name[k=v,...]`: declared options become checked attributes."""

    name: str = ""
    options: tuple[Option, ...] = ()

    def __init__(self, **values: Any) -> None:
        self.values = resolve_options(self.name or type(self).__name__, self.options, values)
        for key, value in self.values.items():
            setattr(self, key, value)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for opt in cls.options:
            if callable(getattr(cls, opt.name, None)):
                raise TypeError(f"{cls.__name__}: option name {opt.name!r} shadows a method")

    @property
    def spec(self) -> str:
        return canonical_spec(self.name, self.options, self.values)
