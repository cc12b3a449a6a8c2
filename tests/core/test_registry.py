"""Names, options and plug-ins: typos get 'did you mean', bad options list the valid ones."""

import importlib.metadata
import sys
import textwrap
from pathlib import Path

import pytest

from bench import registry
from bench.errors import SpecError
from bench.options import parse_spec, split_list
from bench.registry import ESTIMATORS, Registry, include


def test_parse_spec_and_split_list():
    assert parse_spec("full") == ("full", {})
    assert parse_spec(" truncated[k=2, latent_path=true] ") == ("truncated", {"k": "2", "latent_path": "true"})
    assert split_list("full,truncated[k=2,rand=true],sdo") == ["full", "truncated[k=2,rand=true]", "sdo"]
    for bad in ("trunc[k]", "[k=1]", "a[k=1,k=2]"):
        with pytest.raises(SpecError):
            parse_spec(bad)
    with pytest.raises(SpecError, match="unbalanced"):
        split_list("full,truncated[k=2")


def test_unknown_estimator_suggests_the_closest_name():
    with pytest.raises(SpecError, match=r"unknown estimator 'ful'; did you mean 'full'\?.*valid: "):
        ESTIMATORS.create("ful")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(SpecError, match=r"unknown option 'kk' \(did you mean 'k'\?\); valid options: k: int = 1"):
        ESTIMATORS.create("truncated[kk=2]")
    with pytest.raises(SpecError, match="valid options: none"):
        ESTIMATORS.create("full[k=2]")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("truncated[k=two]", "not a valid int"),
        ("truncated[k=0]", "must be >= 1"),
        ("truncated[latent_path=maybe]", "not a valid bool"),
        ("sdo[step=middle]", "first, last, random or a 0-based step index"),
        ("adjoint[recover=memory]", "not one of backward, cache"),
        ("adjoint[steps=-1]", "must be >= 0"),
        ("truncated[rand=true,k_min=5,k_max=2]", "k_min=5 is above k_max=2"),
    ],
)
def test_ill_typed_or_out_of_range_options(spec, message):
    with pytest.raises(SpecError, match=message):
        ESTIMATORS.create(spec)


def test_options_that_depend_on_the_step_count():
    with pytest.raises(SpecError, match="k=12 exceeds the step count N=10; valid: 1 <= k <= 10"):
        ESTIMATORS.create("truncated[k=12]").check_steps(10)
    with pytest.raises(SpecError, match="valid: 0..9"):
        ESTIMATORS.create("sdo[step=10]").check_steps(10)
    ESTIMATORS.create("truncated[k=10]").check_steps(10)
    ESTIMATORS.create("sdo[step=9]").check_steps(10)


def test_canonical_spec_shows_only_non_defaults():
    assert ESTIMATORS.create("truncated[k=1]").spec == "truncated"
    assert ESTIMATORS.create("truncated[latent_path=yes,k=3]").spec == "truncated[k=3,latent_path=true]"
    assert ESTIMATORS.create("draft[k=2]").spec == "truncated[k=2]"  # alias
    est = ESTIMATORS.get("sdo")(step=3)  # typed values from Python work too
    assert est.spec == "sdo[step=3]"


PLUGIN = textwrap.dedent("""
    from bench.registry import register_estimator
    from estimators.full import Full

    @register_estimator
    class {cls}(Full):
        name = "{name}"
        summary = "a test plug-in"
""")


def test_include_registers_from_a_file(tmp_path):
    path = tmp_path / "my_estimator.py"
    path.write_text(PLUGIN.format(cls="Mine", name="mine-from-file"))
    include(path)
    include(path)  # idempotent
    assert ESTIMATORS.create("mine-from-file").spec == "mine-from-file"
    with pytest.raises(SpecError, match="no such Python file"):
        include(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(SpecError, match="broken.py failed: RuntimeError: boom"):
        include(broken)


def test_duplicate_name_is_an_error(tmp_path):
    path = tmp_path / "dup.py"
    path.write_text(PLUGIN.format(cls="Dup", name="full"))
    with pytest.raises(SpecError, match="already registered"):
        include(path)


def test_entry_point_group_registers_installed_plugins(tmp_path, monkeypatch):
    package = tmp_path / "myplugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "est.py").write_text(
        textwrap.dedent("""
        from estimators.sdo import SDO
        class Plugged(SDO):
            name = "plugged"
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.metadata.EntryPoint(name="plugged", value="myplugin.est:Plugged", group=registry.ESTIMATOR_GROUP)
    bad = importlib.metadata.EntryPoint(
        name="not-an-estimator", value="myplugin:__name__", group=registry.ESTIMATOR_GROUP
    )

    def entry_points(group):
        return [entry, bad] if group == registry.ESTIMATOR_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    fresh = Registry("estimator", "estimators.base:Estimator", registry.ESTIMATOR_GROUP, builtins={})
    assert fresh.names() == ["not-an-estimator", "plugged"]
    assert fresh.create("plugged[step=last]").spec == "plugged[step=last]"
    with pytest.raises(SpecError, match="is not a subclass of Estimator"):
        fresh.get("not-an-estimator")
    sys.modules.pop("myplugin.est", None)
    sys.modules.pop("myplugin", None)


def test_an_installed_plugin_package_registers_through_its_entry_point(tmp_path):
    """A real distribution on the path (package + dist-info with entry_points.txt), found by
    importlib.metadata in a fresh interpreter: no monkeypatching."""
    import os
    import subprocess

    site = tmp_path / "site"
    (site / "my_grad_plugin").mkdir(parents=True)
    (site / "my_grad_plugin" / "__init__.py").write_text(
        textwrap.dedent('''
        from estimators.sdo import SDO

        class LastStep(SDO):
            """sdo with the last step kept, shipped by another package."""
            name = "last-step-plugin"
            summary = "sdo[step=last] from an installed plug-in"
    ''')
    )
    info = site / "my_grad_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-grad-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ESTIMATOR_GROUP}]\nlast-step-plugin = my_grad_plugin:LastStep\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    root = Path(__file__).resolve().parents[2]
    listing = subprocess.run(
        [sys.executable, "-m", "bench", "list", "last-step-plugin"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    assert "estimator last-step-plugin" in listing.stdout and "(my_grad_plugin:LastStep)" in listing.stdout
