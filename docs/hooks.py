"""MkDocs hook: the papers' figures live in reports/figures/ (where `python -m bench figures`
writes them); the site serves them as figures/NAME.png without a second copy in the repository."""

from pathlib import Path

from mkdocs.structure.files import File

FIGURES = Path(__file__).resolve().parent.parent / "reports" / "figures"


def on_files(files, config):
    for png in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    return files
