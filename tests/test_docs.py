"""The documentation stays true: its generated parts are the code's declarations, every command
of the getting-started and extending pages runs, its links resolve inside the repository, and no
page carries an issue number or points outside the repository."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

from bench.cli import main
from bench.cli import docs

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
# what readers see besides the pages: figure captions and the folders' own READMEs
PROSE = (
    PAGES
    + sorted((ROOT / "reports" / "figures").glob("*.toml"))
    + [
        ROOT / "reports" / "figures" / "README.md",
        ROOT / "results" / "reference" / "README.md",
    ]
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def test_the_generated_docs_are_the_code_s_declarations():
    """All but the planner's tables (a minute of fake-tensor counting: `make docs` checks them in CI)."""
    assert not docs.stale(planner=False), "generated docs are stale: run python -m bench.cli.docs"


def test_every_estimator_has_a_page_and_a_row():
    import estimators

    for name in estimators.BUILT_IN:
        assert (ROOT / "docs" / "estimators" / f"{name}.md").is_file(), name
        assert f"[`{name}`](docs/estimators/{name}.md)" in (ROOT / "README.md").read_text(), name


def _target(page: Path, link: str) -> Path:
    path = link.split("#", 1)[0]
    if page.parent.name == "docs" and path.startswith("figures/"):  # copied in by docs/hooks.py
        return ROOT / "reports" / path
    return (page.parent / path).resolve()


@pytest.mark.parametrize("page", PROSE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_link_or_reference_leaves_the_repository(page):
    text = page.read_text()
    assert not re.search(r"https?://|www\.", text), "a URL: the docs point inside the repository only"
    assert not re.search(r"\.\./shared|/work/|MACHINE-FACTS|ESTIMATORS\.md|STYLE\.md", text), "outside the repo"
    assert not re.search(r"\b[\w.-]+/[\w.-]+#\d+", text), "a reference to another repository's issue"
    for link in LINK.findall(text) if page.suffix == ".md" else ():
        if link.startswith("#"):
            continue
        target = _target(page, link)
        assert target.exists(), f"{link} does not resolve"
        assert ROOT in target.parents, f"{link} leaves the repository"


@pytest.mark.parametrize("page", PROSE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers_in_what_readers_see(page):
    text = page.read_text()
    headings = [line for line in text.splitlines() if line.startswith("#") and re.search(r"\d", line)]
    assert not [h for h in headings if re.search(r"\bissues?\b", h, re.I)], headings
    found = re.findall(r"\b(?:issues?|items?|slice) #?\d+", text, re.I)
    assert not found, found


def test_every_document_a_docstring_cites_is_in_the_repository():
    cited = set()
    for package in ("bench", "estimators", "tasks", "examples", "tests"):
        for path in (ROOT / package).rglob("*.py"):
            if path == Path(__file__).resolve():
                continue  # this test names what it looks for
            text = path.read_text()
            assert "ESTIMATORS.md" not in text and "MACHINE-FACTS" not in text, path
            cited.update(re.findall(r"\b(docs/[\w/.-]+\.md)\b", text))
    assert cited, "no docstring cites the docs?"
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, missing


def _blocks(page: Path):
    """(language, body) of each fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def _commands(body: str) -> list[list[str]]:
    lines = body.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["getting-started.md", "extending.md"])
def test_every_command_of_the_page_runs_as_shown(name, tmp_path, monkeypatch, capsys):
    """Each `# file:` block written, each command block run in order, in a fresh folder: `cp`
    from the repository, `python -m bench ...` through the command line's main."""
    monkeypatch.chdir(tmp_path)
    ran = 0
    for language, body in _blocks(ROOT / "docs" / name):
        first = body.splitlines()[0] if body.strip() else ""
        if language == "python" and first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(body)
            continue
        if language != "bash":
            continue
        for command in _commands(body):
            if command[0] == "cp":
                shutil.copy(ROOT / command[1], tmp_path / command[2])
                continue
            assert command[:3] == ["python", "-m", "bench"], f"{name}: a command the test cannot run: {command}"
            code = main(command[3:])
            assert code == 0, (name, command, capsys.readouterr())
            ran += 1
    assert ran >= 4, f"{name} shows {ran} commands"
    if name == "getting-started.md":
        assert (tmp_path / "reports" / "first" / "index.html").is_file()
    else:
        page = (tmp_path / "reports" / "mine" / "index.md").read_text()
        assert "| draft-ckpt[k=2] |" in page and "| truncated[k=2] |" in page


def test_the_readme_is_one_screenful_that_routes_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in ("getting-started", "cli", "extending", "findings", "methodology", "estimators/index"):
        assert f"(docs/{page}.md)" in readme, page
