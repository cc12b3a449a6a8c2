"""Cell identity: a content key from the readable specs plus a hash of the code that produced
the numbers, so a changed estimator or task never reuses a stale row."""
from __future__ import annotations

import hashlib
import inspect
import json
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

PROJECT_PACKAGES = ("bench", "estimators", "tasks")
_INSTALLED = tuple(str(Path(p).resolve()) for p in {sysconfig.get_paths()[k] for k in
                                                    ("stdlib", "platstdlib", "purelib", "platlib")})


def _module_source(module: ModuleType) -> str:
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""


def _is_library(module: ModuleType) -> bool:
    """The standard library, or an installed third-party package (torch, diffusers...): pinned by
    the environment in run.json, not by the cell key."""
    file = getattr(module, "__file__", None)
    if not file:
        return True  # built-in or namespace module: no source of its own
    return str(Path(file).resolve()).startswith(_INSTALLED)


def code_modules(cls: type) -> dict[str, ModuleType]:
    """Every module whose code can change what `cls` computes: its module and its bases' modules,
    and, transitively, the modules they draw names from, except the standard library and
    installed third-party packages. A plug-in's own package and helper modules are followed even
    when installed (they share the top-level name of a class in the MRO)."""
    roots = {klass.__module__.split(".")[0] for klass in cls.__mro__ if klass is not object}
    roots.update(PROJECT_PACKAGES)
    pending = [sys.modules[k.__module__] for k in cls.__mro__ if k is not object and k.__module__ in sys.modules]
    found: dict[str, ModuleType] = {}
    while pending:
        module = pending.pop()
        if module.__name__ in found:
            continue
        if module.__name__.split(".")[0] not in roots and _is_library(module):
            continue
        found[module.__name__] = module
        for value in list(vars(module).values()):
            if isinstance(value, ModuleType):
                pending.append(value)
                continue
            name = getattr(value, "__module__", None)
            if isinstance(name, str) and name in sys.modules and name not in found:
                pending.append(sys.modules[name])
    return found


def code_hash(cls: type) -> str:
    """Hash of the source of code_modules(cls). The sources alone are hashed (sorted by their own
    digest), not module names, so the same file included under another generated name or from
    another folder hashes the same."""
    sources = sorted(hashlib.sha256(_module_source(m).encode()).hexdigest() for m in code_modules(cls).values())
    return hashlib.sha256("".join(sources).encode()).hexdigest()[:12]


def cell_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
