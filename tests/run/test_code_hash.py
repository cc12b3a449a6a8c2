"""The code hash of a cell follows what it runs: an included file hashes the same whatever the
order of inclusion, the modules an estimator uses are followed, and trained weights are in the key."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from bench.run.identity import code_hash, code_modules
from bench.registry import ESTIMATORS, include
from bench.run.runner import SweepSpec, expand, resolve


ROOT = Path(__file__).resolve().parents[2]


def _plugin(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


HASH_OF = textwrap.dedent("""
    import sys
    from bench.run.identity import code_hash
    from bench.registry import ESTIMATORS, include
    for path in sys.argv[2:]:
        include(path)
    print(code_hash(ESTIMATORS.get(sys.argv[1])))
""")


def test_the_code_hash_of_an_included_file_does_not_depend_on_include_order(tmp_path):
    a = _plugin(
        tmp_path,
        "plug_a",
        """
        from bench.api import register_estimator
        from estimators.full import Full
        @register_estimator
        class A(Full):
            name = "plug-a"
    """,
    )
    b = _plugin(
        tmp_path,
        "plug_b",
        """
        from bench.api import register_estimator
        from estimators.sdo import SDO
        @register_estimator
        class B(SDO):
            name = "plug-b"
    """,
    )
    hashes = [
        subprocess.run(
            [sys.executable, "-c", HASH_OF, "plug-a", *order], cwd=ROOT, capture_output=True, text=True, timeout=120
        ).stdout.strip()
        for order in ([str(a), str(b)], [str(b), str(a)])
    ]
    assert hashes[0] and hashes[0] == hashes[1]


def test_the_code_hash_follows_what_an_estimator_uses(tmp_path, monkeypatch):
    """A plug-in subclass of full depends on the masked chain full uses, and on its own helper
    module; a change to either changes the hash (so its cells rerun)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    helper = _plugin(
        tmp_path,
        "diffgrad_test_helper",
        """
        def scale():
            return 1.0
    """,
    )
    plugin = _plugin(
        tmp_path,
        "uses_helper",
        """
        from bench.api import register_estimator
        from estimators.full import Full
        from diffgrad_test_helper import scale
        @register_estimator
        class UsesHelper(Full):
            name = "test-uses-helper"
    """,
    )
    include(plugin)
    cls = ESTIMATORS.get("test-uses-helper")
    modules = code_modules(cls)
    assert {"estimators.masked_chain", "bench.chain", "diffgrad_test_helper"} <= set(modules)
    assert not any(name.split(".")[0] in ("torch", "diffusers", "random") for name in modules)
    before = code_hash(cls)
    time.sleep(0.01)
    helper.write_text("def scale():\n    return 2.0\n")
    os.utime(helper, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse clocks
    assert code_hash(cls) != before


def test_trained_weights_are_in_the_cell_key(tmp_path):
    from tasks.digits import paths
    from digits_fixtures import write_random_models

    one, two = write_random_models(tmp_path / "one", seed=0), write_random_models(tmp_path / "two", seed=1)
    keys = []
    for folder in (one, two, one):
        spec = SweepSpec(tasks=[f"digits[models={one}]"], estimators=["full"], targets=["cond"], steps=[2])
        if folder is two:  # the same path, retrained weights
            paths_before = {name: (one / name).read_bytes() for name in paths.FILES}
            for name in paths.FILES:
                (one / name).write_bytes((two / name).read_bytes())
        keys.append(expand(spec, *resolve(spec))[0].key)
        if folder is two:
            for name, data in paths_before.items():
                (one / name).write_bytes(data)
    assert keys[0] != keys[1] and keys[0] == keys[2]
