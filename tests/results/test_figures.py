"""Figures and pages: row strings are plain text (never markup), and figures from unchanged rows
are byte-identical to the committed ones."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from bench.results import store
from bench.chain import Chain, Schedule
from bench.cli import main
from bench.run.identity import code_hash, code_modules
from bench.problem import Problem
from bench.registry import ESTIMATORS, include
from bench.run.runner import SweepSpec, expand, resolve, run_sweep


TOY = "toy[d=2,batch=2]"
FAST = ["--tasks", TOY, "--steps", "2", "--iters", "1", "--rounds", "1", "--no-memory", "--no-progress"]


def test_markup_in_row_strings_is_plain_text_in_reports(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(["run", *FAST, "--steps", "2,3", "--estimators", "full,sdo", "--targets", "cond", "--out", str(run_dir)])
        == 0
    )
    text = (run_dir / "rows.jsonl").read_text().replace('"sdo"', '"$x^2$ *bold* <b>|"')
    (run_dir / "rows.jsonl").write_text(text)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report"), "--svg"]) == 0
    page = (tmp_path / "report" / "index.md").read_text()
    assert r"\$x^2\$ \*bold\* \<b\>\|" in page
    assert "$x^2$ *bold* &lt;b&gt;|" in (tmp_path / "report" / "index.html").read_text()
    svg = next((tmp_path / "report").glob("*.svg")).read_text()
    assert "$x^2$ *bold*" in svg  # drawn as typed, not as math


# -- figures: identical rows, identical files -----------------------------------------------------


def test_figures_from_unchanged_rows_are_byte_identical_to_the_committed_ones(tmp_path):
    from bench.results.figures import FIGURES, render_all

    render_all(FIGURES, tmp_path)
    committed = sorted(p for p in FIGURES.iterdir() if p.suffix in (".svg", ".png", ".md"))
    assert len(committed) >= 9
    changed = [p.name for p in committed if (tmp_path / p.name).read_bytes() != p.read_bytes()]
    assert not changed, f"regenerating changed {changed}: figures must be reproducible (and committed)"
