"""The layering contract: every module of the project belongs to one layer, imports (at module
level or inside a function) only from its own layer or the ones below, and no two modules import
each other, directly or around a loop. Data flows one way: the model plug-ins build on (core),
the timer, the plug-ins (estimators, tasks), reading rows (results), running sweeps (run), the
conformance suites (check), the command line."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "estimators", "tasks")

# lowest first: a module may import from its layer and the layers below it (earlier in this list);
# the packages say which layer a module is in, the flat modules of bench/ are the core
LAYERS = {
    "core": (
        "bench.errors",
        "bench.options",
        "bench.registry",
        "bench.chain",
        "bench.problem",
        "bench.capabilities",
        "bench.rewards",
        "bench.samplers",
    ),
    "measure": ("bench.measure",),
    "plug-ins": ("estimators", "tasks", "bench.api", "bench.gating"),
    "results": ("bench.results",),
    "planner": ("bench.planner",),
    "run": ("bench.run",),
    "check": ("bench.check",),
    "cli": ("bench.cli", "bench.__main__"),
}
ORDER = list(LAYERS)


def layer_of(module: str) -> str:
    if module == "bench":  # the package's __init__: its version only
        return "core"
    best = max(
        (
            (prefix, layer)
            for layer, prefixes in LAYERS.items()
            for prefix in prefixes
            if module == prefix or module.startswith(prefix + ".")
        ),
        key=lambda p: len(p[0]),
        default=None,
    )
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (the longest known prefix of each)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            targets.update(submodules or {base})  # `from bench import store` imports bench.results.store
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
        for a, targets in graph().items()
        for b in targets
        if ORDER.index(layer_of(b)) > ORDER.index(layer_of(a))
    ]
    assert not upward, upward


def test_no_import_cycles():
    edges = graph()
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    edges = {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in edges.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_every_module_is_in_a_layer():
    for name in modules():
        layer_of(name)


# what the core and the in-process measurement may not reach for: processes, job schedulers, plots
NOT_IN_CORE = ("subprocess", "multiprocessing", "concurrent", "submitit", "matplotlib", "rich", "signal")


def test_the_core_and_measurement_start_no_processes_and_draw_nothing():
    found = modules()
    offending = []
    for name, path in found.items():
        if layer_of(name) not in ("core", "measure"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offending += [f"{name} imports {n}" for n in names if n.split(".")[0] in NOT_IN_CORE]
    assert not offending, offending


def test_the_former_module_names_import_the_moved_modules_themselves():
    """bench.runner, bench.store... (the flat layout's names) are the moved modules, one object
    each, so a name patched through either path is seen by both; `python -m` runs them too."""
    import importlib
    import subprocess
    import sys

    from bench import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    assert set(MOVED.values()) <= set(modules()), "an alias names a module that does not exist"
    from bench.runner import SweepSpec
    from bench.run.settings import SweepSpec as declared

    assert SweepSpec is declared
    done = subprocess.run(
        [sys.executable, "-m", "bench.settings"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "| `--tasks SPEC,...` |" in done.stdout, done.stderr[-1000:]
