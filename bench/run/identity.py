"""Cell identity: a content key from the readable specs plus a hash of the code that produced
the numbers, so a changed estimator, task, sampler or reference never reuses a stale row.

What is hashed is the code, not its documentation: each module's syntax tree with docstrings
removed (comments and blank lines never reach the tree), so editing a docstring or a comment
re-keys nothing. Which modules: those of the objects a cell runs (its task, its estimator, and
what they resolve by name at run time: the sampler, a reward, the reference estimator; see
`Task.code_objects` and `Estimator.code_objects`), and, transitively, every module they import,
at module level or inside a function, and every module a name they hold was defined in. The
standard library and installed third-party packages are pinned by the environment in run.json,
not by the key. The harness that measures (timing, memory, the runner) is not in the key either:
docs/methodology.md, "What a cell's key covers"."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

PROJECT_PACKAGES = ("bench", "estimators", "tasks")
_INSTALLED = tuple(
    str(Path(p).resolve()) for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)
# file -> ((mtime_ns, size), digest of its code, names it imports), read once per file version
_PARSED: dict[str, tuple[tuple[int, int], str, tuple[str, ...]]] = {}


def _file_of(name: str, roots: set[str]) -> str | None:
    """The source file of module `name`, imported or not (None: built-in, namespace, not found).
    A module not imported yet is looked up without importing anything but, for the project's and
    plug-ins' own packages, its parent packages."""
    module = sys.modules.get(name)
    if module is not None:
        file = getattr(module, "__file__", None)
    else:
        parent = name.rpartition(".")[0]
        if parent and parent not in sys.modules and name.split(".")[0] not in roots:
            return None
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            return None
        file = spec.origin if spec is not None and spec.has_location else None
    return file if file and file.endswith(".py") and os.path.isfile(file) else None


def _is_library(file: str) -> bool:
    """The standard library, or an installed third-party package (torch, diffusers...)."""
    return str(Path(file).resolve()).startswith(_INSTALLED)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _imported_names(tree: ast.AST, name: str, is_package: bool) -> tuple[str, ...]:
    """Every module an import statement anywhere in the tree may load: `import a.b` gives a.b,
    `from a import b` gives a and a.b (b may be a submodule), relative imports resolved against
    the module's package."""
    package = name if is_package else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    continue
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                origin = f"{base}.{node.module}" if node.module and base else (node.module or base)
            else:
                origin = node.module or ""
            if not origin:
                continue
            found.append(origin)
            found.extend(f"{origin}.{alias.name}" for alias in node.names if alias.name != "*")
    return tuple(dict.fromkeys(found))


def _parsed(name: str, file: str) -> tuple[str, tuple[str, ...]]:
    """(digest of the module's code without docstrings, modules it imports), cached per version."""
    stat = os.stat(file)
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _PARSED.get(file)
    if cached is None or cached[0] != version:
        source = Path(file).read_bytes()
        try:
            tree = ast.parse(source, filename=file)
        except SyntaxError:  # hash the bytes: the module would not import anyway
            digest, imports = hashlib.sha256(source).hexdigest(), ()
        else:
            is_package = Path(file).name == "__init__.py"
            imports = _imported_names(tree, name, is_package)
            digest = hashlib.sha256(ast.dump(_strip_docstrings(tree)).encode()).hexdigest()
        cached = _PARSED[file] = (version, digest, imports)
    return cached[1], cached[2]


def _module_names(objects: Iterable[Any]) -> list[str]:
    names = []
    for obj in objects:
        classes = obj.__mro__ if isinstance(obj, type) else (obj,)
        names.extend(
            k.__module__ for k in classes if k is not object and isinstance(getattr(k, "__module__", None), str)
        )
    return names


def code_modules(*objects: Any) -> dict[str, str]:
    """Module name -> source file of every module whose code can change what `objects` (classes,
    with their bases, or functions) compute: theirs, and transitively every module those import
    anywhere or draw a module-level name from, except the standard library and installed
    third-party packages. A plug-in's own package and helper modules are followed even when
    installed (they share the top-level name of one of the objects' modules)."""
    starts = _module_names(objects)
    roots = {name.split(".")[0] for name in starts} | set(PROJECT_PACKAGES)
    pending, found, seen = list(starts), {}, set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        file = _file_of(name, roots)
        if file is None or (name.split(".")[0] not in roots and _is_library(file)):
            continue
        found[name] = file
        _, imports = _parsed(name, file)
        pending.extend(imports)
        module = sys.modules.get(name)
        if isinstance(module, ModuleType):  # names bound at run time (e.g. by importlib)
            for value in list(vars(module).values()):
                if isinstance(value, ModuleType):
                    if not value.__name__.startswith(f"{name}."):  # a package's submodules appear as
                        pending.append(value.__name__)  # its attributes once imported: not its code
                    continue
                else:
                    origin = getattr(value, "__module__", None)
                    if isinstance(origin, str):
                        pending.append(origin)
    return found


def code_hash(*objects: Any) -> str:
    """Hash of the code (not the docstrings or comments) of code_modules(*objects). The module
    digests alone are hashed, sorted, not module names, so the same file included under another
    generated name or from another folder hashes the same."""
    digests = sorted({_parsed(name, file)[0] for name, file in code_modules(*objects).items()})
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:12]


def cell_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
