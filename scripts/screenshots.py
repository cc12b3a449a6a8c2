"""Screenshots of what a reader sees, in headless Chromium: a run's HTML report and pages of the
documentation site. Look at them after changing the report or the docs (tables wider than the
page, images not found, unreadable plots).

    make docs                                    # builds site/
    python -m bench report results/first         # writes reports/first/index.html
    python scripts/screenshots.py --report reports/first --out screenshots

Needs a Chromium (Debian: `apt-get install chromium`); `--chromium PATH` names another binary.
Writes OUT/report.png and OUT/docs-<page>.png, one window of 1280 px wide each, and prints, per
page, whether the page is wider than its window (a table or an image that overflows)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGES = ("index", "getting-started", "estimators", "findings", "cli")
WIDTH = 1280
# set by the page itself: a title that says whether anything is wider than the window
PROBE = (
    "<script>addEventListener('load', () => {{ const w = document.documentElement.scrollWidth;"
    " document.title = 'WIDTH ' + w + ' HEIGHT ' + document.documentElement.scrollHeight; }});</script>"
)


def chromium(binary: str, *args: str) -> str:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"error: {binary} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def measure(binary: str, page: Path) -> tuple[int, int]:
    """(scroll width, scroll height) of `page` laid out at WIDTH px, read from a copy with a probe."""
    with tempfile.NamedTemporaryFile("w", suffix=".html", dir=page.parent, delete=False) as copy:
        copy.write(page.read_text().replace("</body>", PROBE.format() + "</body>"))
    try:
        dom = chromium(binary, f"--window-size={WIDTH},900", "--dump-dom", copy.name and Path(copy.name).as_uri())
    finally:
        Path(copy.name).unlink()
    title = dom.split("<title>WIDTH ", 1)[1].split("</title>", 1)[0] if "<title>WIDTH " in dom else ""
    if not title:
        return WIDTH, 2000
    width, _, height = title.split()
    return int(width), int(height)


def shoot(binary: str, page: Path, out: Path) -> None:
    width, height = measure(binary, page)
    chromium(binary, f"--window-size={WIDTH},{min(max(height, 900), 8000)}", f"--screenshot={out}", page.as_uri())
    verdict = f"wider than the window ({width} px > {WIDTH} px)" if width > WIDTH else "fits the window"
    print(f"{out}: {page.relative_to(ROOT) if ROOT in page.parents else page}, {height} px tall, {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/screenshots.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, help="a report folder (holds index.html)")
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="the built docs site (default: site/)")
    parser.add_argument("--out", type=Path, default=ROOT / "screenshots", help="where the PNGs go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    args = parser.parse_args(argv)
    if not args.chromium:
        print(
            "error: no chromium on PATH; install it (Debian: apt-get install chromium) or give --chromium",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report is not None:
        page = args.report.resolve() / "index.html"
        if not page.is_file():
            print(f"error: {page} not found; write it with python -m bench report RUN_DIR", file=sys.stderr)
            return 2
        shoot(args.chromium, page, args.out / "report.png")
    if not (args.site / "index.html").is_file():
        print(f"error: {args.site}/index.html not found; build the site with make docs", file=sys.stderr)
        return 2
    for name in DOCS_PAGES:
        page = args.site.resolve() / ("index.html" if name == "index" else f"{name}/index.html")
        if page.is_file():
            shoot(args.chromium, page, args.out / f"docs-{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
