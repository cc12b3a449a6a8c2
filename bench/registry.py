"""Name -> class registries for estimators and tasks: built-ins are lazy `module:Class` entries;
plug-ins come from a Python entry-point group or from `--include path/to/file.py`."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from bench.errors import SpecError, exception_text
from bench.options import parse_spec

ESTIMATOR_GROUP = "diffgrad_bench.estimators"
TASK_GROUP = "diffgrad_bench.tasks"
SAMPLER_GROUP = "diffgrad_bench.samplers"


class Registry:
    """Names -> classes of one kind. `builtins` is a dict of name -> "module:Class", or the path
    "package:BUILT_IN" of such a dict in the package that holds the kind's modules (read on first
    use, with the package's ALIASES beside it), so that adding a built-in touches that package only."""

    def __init__(
        self,
        kind: str,
        base_path: str,
        group: str,
        builtins: dict[str, str] | str,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.kind, self.base_path, self.group = kind, base_path, group
        self._table = builtins if isinstance(builtins, str) else None
        self._entries: dict[str, str | type] = {} if self._table else dict(builtins)
        self._aliases = dict(aliases or {})
        self._plugins_loaded = False

    def _read_table(self) -> None:
        if self._table is not None:
            table, self._table = self._table, None
            module = importlib.import_module(table.partition(":")[0])
            for name, entry in getattr(module, table.partition(":")[2]).items():
                self._entries.setdefault(name, entry)
            for alias, name in getattr(module, "ALIASES", {}).items():
                self._aliases.setdefault(alias, name)

    @property
    def base(self) -> type:
        return _load(self.base_path)

    def register(self, cls: type, name: str | None = None, aliases: tuple[str, ...] = ()) -> type:
        self._read_table()
        name = name or getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__name__} has no `name`; set the class attribute")
        if not isinstance(cls, type) or not issubclass(cls, self.base):
            raise TypeError(f"{cls!r} is not a subclass of {self.base.__name__}")
        existing = self._entries.get(name)
        if existing is not None and existing is not cls:
            raise SpecError(f"{self.kind} {name!r} is already registered ({_describe(existing)})")
        self._entries[name] = cls
        for alias in aliases:
            self._aliases[alias] = name
        return cls

    def load_plugins(self) -> None:
        """Register what installed packages declare in this registry's entry-point group."""
        self._read_table()
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for entry in importlib.metadata.entry_points(group=self.group):
            if entry.name not in self._entries:
                self._entries[entry.name] = entry.value

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def listed(self) -> list[str]:
        """The names in the order they were listed: the built-in table's, then plug-ins'."""
        self.load_plugins()
        return list(self._entries)

    def get(self, name: str) -> type:
        self.load_plugins()
        name = self._aliases.get(name, name)
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries) + list(self._aliases), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(f"unknown {self.kind} {name!r}; {hint}valid: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            try:
                entry = _load(entry)
            except Exception as exc:  # a broken plug-in must not look like a typo
                raise SpecError(
                    f"{self.kind} {name!r} failed to load from {self._entries[name]}: "
                    f"{type(exc).__name__}: {exception_text(exc)}"
                ) from None
            if not isinstance(entry, type) or not issubclass(entry, self.base):
                raise SpecError(
                    f"{self.kind} {name!r} ({self._entries[name]}) is not a subclass of {self.base.__name__}"
                )
            self._entries[name] = entry
        return entry

    def create(self, spec: str) -> Any:
        """Instantiate from 'name[k=v,...]', with options checked against the declared ones."""
        name, values = parse_spec(spec)
        return self.get(name)(**values)


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _describe(entry: str | type) -> str:
    return entry if isinstance(entry, str) else origin(entry)


def origin(cls: type) -> str:
    """Where a registered class comes from: module:Class, or the file an --include loaded it from."""
    module = sys.modules.get(cls.__module__)
    if cls.__module__.startswith("_bench_include_") and getattr(module, "__file__", None):
        return f"{module.__file__}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


ESTIMATORS = Registry("estimator", "estimators.base:Estimator", ESTIMATOR_GROUP, builtins="estimators:BUILT_IN")
TASKS = Registry("task", "tasks.base:Task", TASK_GROUP, builtins="tasks:BUILT_IN")


def register_estimator(
    cls: type | None = None, *, name: str | None = None, aliases: tuple[str, ...] = ()
) -> Callable[[type], type] | type:
    """Class decorator: `@register_estimator` makes an Estimator subclass available by name."""

    def wrap(klass: type) -> type:
        return ESTIMATORS.register(klass, name=name, aliases=aliases)

    return wrap(cls) if cls is not None else wrap


def register_task(cls: type | None = None, *, name: str | None = None) -> Callable[[type], type] | type:
    def wrap(klass: type) -> type:
        return TASKS.register(klass, name=name)

    return wrap(cls) if cls is not None else wrap


_INCLUDED: dict[str, Any] = {}


def include(path: str | Path) -> None:
    """Import a Python file so that its @register_estimator / @register_task decorators run."""
    file = Path(path).expanduser().resolve()
    if not file.is_file() or file.suffix != ".py":
        raise SpecError(f"--include {path}: no such Python file")
    if str(file) in _INCLUDED:
        return
    # The module name depends on the file alone (not on the order of --include flags).
    module_name = f"_bench_include_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SpecError:
        raise
    except SystemExit as exc:  # sys.exit() while being imported: not a way to end the sweep silently
        del sys.modules[module_name]
        raise SpecError(
            f"--include {path} called sys.exit({exc.code!r}) while being imported; an include file "
            "defines and registers estimators or tasks, and nothing in it may end the program"
        ) from None
    except Exception as exc:
        del sys.modules[module_name]
        raise SpecError(f"--include {path} failed: {type(exc).__name__}: {exception_text(exc)}") from None
    _INCLUDED[str(file)] = module
