"""Cell identity: a content key from the readable specs plus a hash of the code that produced
the numbers, so a changed estimator or task never reuses a stale row."""
from __future__ import annotations

import hashlib
import inspect
import json
import sys
from types import ModuleType
from typing import Any

PROJECT_PACKAGES = ("bench", "estimators", "tasks")


def _module_source(module: ModuleType) -> str:
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""


def code_hash(cls: type) -> str:
    """Hash of the class's module, its base classes' modules, and the project modules its module
    draws names from (e.g. the shared chain engine)."""
    modules: dict[str, ModuleType] = {}
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and klass is not object:
            modules[module.__name__] = module
    home = sys.modules.get(cls.__module__)
    for value in vars(home).values() if home else ():
        name = getattr(value, "__module__", None) or getattr(value, "__name__", "")
        if isinstance(name, str) and name.split(".")[0] in PROJECT_PACKAGES and name in sys.modules:
            modules[name] = sys.modules[name]
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode())
        digest.update(_module_source(modules[name]).encode())
    return digest.hexdigest()[:12]


def cell_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
