"""python -m bench report DIR: a Markdown and an HTML page with one comparison table and one
six-panel figure per task and target (memory, time and gradient cosine against N; reward against
iteration and against wall-clock; memory against time coloured by reward)."""

from __future__ import annotations

import hashlib
import html
import math
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from bench.results import analysis, plots, store
from bench.results.summary import RSS_PAGE, format_bytes, ratio_text

MEMORY_KINDS = {
    "rss_peak": "peak resident memory of a process forked per cell, above its resident size before the call",
    "rss_peak_inprocess": "resident high-water mark in the sweep's process, above the size before the call",
    "cuda_max_allocated": "torch.cuda.max_memory_allocated during the call, above the allocation before it",
}


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) + suffix


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def comparison_table(means: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = [
        "estimator",
        "N",
        "seeds",
        "ms / grad",
        "× full",
        "time ÷ model",
        "peak mem",
        "× full",
        "mem ÷ model",
        "fwd / vjp (model)",
        "grad cos",
        "rel err",
        "reward init → final",
        "gain",
    ]
    quality = [m for m in ("fid", "kid", "accuracy") if f"eval_{m}" in means and means[f"eval_{m}"].notna().any()]
    header += [f"{m.upper() if m != 'accuracy' else 'accuracy'} init → final" for m in quality]
    body = []
    for spec in plots.order(means["estimator"]):
        for _, r in means[means["estimator"] == spec].sort_values("steps").iterrows():
            counts = (
                f"{_fmt(r['nfe_forward'], '.0f')} / {_fmt(r['nfe_vjp'], '.0f')} "
                f"({_fmt(r['nfe_forward_pred'], '.0f')} / {_fmt(r['nfe_vjp_pred'], '.3g')})"
            )
            suspect = " !" if r.get("suspect") else ""
            body.append(
                [
                    spec,
                    str(r["steps"]),
                    str(r["seeds"]),
                    _fmt(r["time_s"] * 1e3, ".1f") + suspect,
                    ratio_text(r),
                    _fmt(r.get("time_over_pred"), ".2f"),
                    format_bytes(r["peak_mem_bytes"], RSS_PAGE if r["mem_kind"] == "rss_peak" else 0),
                    _fmt(r["peak_mem_bytes_vs_full"], ".2f"),
                    f"{_fmt(r['mem_over_pred'], '.2f')} ({r['mem_class'] or '–'})",
                    counts,
                    _fmt(r["grad_cos"], ".4f"),
                    _fmt(r["grad_rel_err"], ".2e"),
                    f"{_fmt(r['reward_init'], '.3g')} → {_fmt(r['reward_final'], '.3g')}",
                    _fmt(r["reward_gain"], "+.3g"),
                    *[f"{_fmt(r.get(f'eval_{m}_init'), '.3g')} → {_fmt(r[f'eval_{m}'], '.3g')}" for m in quality],
                ]
            )
    return header, body


def quality_note(means: pd.DataFrame) -> str | None:
    """What the quality columns compare with, and the real-versus-real floor."""
    if "eval_fid" not in means or means["eval_fid"].isna().all():
        return None
    first = means.dropna(subset=["eval_fid"]).iloc[0]
    floors = [
        f"{name.upper()} {first[f'eval_{name}_floor']:.3g}"
        for name in ("fid", "kid")
        if pd.notna(first.get(f"eval_{name}_floor"))
    ]
    return (
        f"Quality: FID and KID of the samples against {first.get('eval_reference') or 'the task reference'}, "
        f"before ('init': the unoptimised sampler at the same point) and after the optimisation; "
        f"two halves of those real images score {', '.join(floors) or 'n/a'} (the floor at that size). "
        f"KID is unbiased at small sample sizes; FID of few samples is not."
    )


def phases_table(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]] | None:
    table = analysis.phase_table(frame)
    if table.empty:
        return None
    names = [
        c
        for c in (
            "setup",
            "reference",
            "agreement",
            "units",
            "timing",
            "memory",
            "optimise",
            "evaluate",
            "samples",
            "harness",
        )
        if c in table
    ]
    header = ["task", "target", *[f"{n} s" for n in names], "cell s", "outside measurement"]
    body = [
        [
            r["task"],
            r["target"],
            *[_fmt(r[n], ".1f") for n in names],
            _fmt(r["cell"], ".1f"),
            _fmt(r["harness_fraction"], ".1%"),
        ]
        for _, r in table.iterrows()
    ]
    return header, body


def panel_figure(means: pd.DataFrame, curves: pd.DataFrame, title: str):
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    plots.lines_vs_steps(axes[0, 0], means, "peak_mem_bytes", "peak memory per gradient (MiB)", scale=1 / plots.MIB)
    axes[0, 0].set_title("memory vs N")
    plots.lines_vs_steps(axes[0, 1], means, "time_s", "time per gradient (ms)", scale=1e3)
    axes[0, 1].set_title("time vs N")
    plots.lines_vs_steps(axes[0, 2], means, "grad_cos", "cosine to the exact gradient", log=False)
    axes[0, 2].set_title("gradient agreement vs N")
    axes[0, 2].axhline(1.0, color="#bbbbbb", linewidth=0.8)
    largest = int(curves["steps"].max()) if not curves.empty else None
    at_largest = curves[curves["steps"] == largest]
    plots.reward_curves(axes[1, 0], at_largest, "iteration")
    axes[1, 0].set_title(f"reward vs iteration (N = {largest})")
    plots.reward_curves(axes[1, 1], at_largest, "seconds")
    axes[1, 1].set_title(f"reward vs wall-clock (N = {largest})")
    if "eval_kid_init" in means and means["eval_kid_init"].notna().any():
        plots.tradeoff(axes[1, 2], means, "eval_kid", "KID")
        axes[1, 2].set_title("reward bought against quality (KID)")
    else:
        plots.pareto(axes[1, 2], means)
        axes[1, 2].set_title("memory vs time (colour: reward gain)")
    fig.suptitle(title, fontsize=14)
    plots.legend_below(fig, axes)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig


_MD_SPECIAL = re.compile(r"([\\`*{}<>|$~]|\](?=[(\[:])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def md_escape(text: str) -> str:
    """Plain text for Markdown: every character Markdown (or a renderer's math) could read as
    markup is backslash-escaped, so row strings (specs, reasons, errors) show as written. A
    bracket only where it could close a link ('](', '][', ']:') and an underscore only at a word's
    edge, so that specs such as truncated[k=2] and names such as rss_peak stay readable."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


class Page:
    """The same content rendered as Markdown and as HTML; every text is plain text in both."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {md_escape(text)}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.md.append(md_escape(text) + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def items(self, lines: list[str]) -> None:
        if lines:
            self.md.append("\n".join(f"- {md_escape(line)}" for line in lines) + "\n")
            self.html.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")

    def image(self, path: str, alt: str, pixels: bool = False) -> None:
        """A figure; `pixels`: a grid of small samples, drawn large with its pixels kept sharp
        (8x8 digits are unreadable at their own size), its caption beside it."""
        self.md.append(f"![{md_escape(alt)}]({path})\n")
        if pixels:
            self.html.append(
                f'<figure><img src="{html.escape(path)}" alt="{html.escape(alt)}" '
                'style="width:100%;max-width:640px;image-rendering:pixelated">'
                f"<figcaption>{html.escape(alt)}</figcaption></figure>"
            )
        else:
            self.html.append(f'<img src="{html.escape(path)}" alt="{html.escape(alt)}" style="max-width:100%">')

    def table(self, header: list[str], body: list[list[str]]) -> None:
        cell = md_escape
        lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in body]
        self.md.append("\n".join(lines) + "\n")
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")

    def write(self, folder: Path, title: str) -> tuple[Path, Path]:
        md_path, html_path = folder / "index.md", folder / "index.html"
        md_path.write_text("\n".join(self.md))
        style = (
            "body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
            "text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}"
        )
        html_path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(self.html)}</body></html>"
        )
        return md_path, html_path


def environment_line(meta: dict[str, Any]) -> str:
    if not meta:
        return "No run.json: environment unknown."
    commit = (meta.get("git_commit") or "unknown")[:10] + (" (dirty)" if meta.get("git_dirty") else "")
    return (
        f"Device {meta.get('device')} ({meta.get('device_name')}), {meta.get('cpu_threads')} CPU threads, "
        f"torch {meta.get('torch')}, diffusers {meta.get('diffusers')}, commit {commit}, "
        f"last started {meta.get('started')}."
    )


def default_name(run_dir: Path) -> str:
    """The report's folder under reports/: the run folder's name made safe for a path, or, for a
    name with nothing left of it ('@@@', '/'), 'run-' and a hash of the folder's path."""
    folder = Path(run_dir).resolve()
    return _slug(folder.name) or f"run-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"


def rows_files_text(run_dir: Path) -> str:
    """Where the rows were read: rows.jsonl and/or the jobs' files under rows.d/."""
    files = [path for path in store.row_files(run_dir) if path.is_file()]
    jobs = [path for path in files if path.parent.name == store.ROWS_DIR]
    parts = ([str(run_dir / store.ROWS)] if run_dir / store.ROWS in files else []) + (
        [f"{len(jobs)} job file(s) under {run_dir / store.ROWS_DIR}"] if jobs else []
    )
    return " and ".join(parts)


def write_report(run_dir: Path, out: Path | None = None, formats=("png",)) -> Path:
    frame, meta = analysis.load_run(run_dir)
    out = out or Path("reports") / default_name(run_dir)
    store.writable_folder(out, "--out")
    means, curves = analysis.cell_means(frame), analysis.curves(frame)
    page = Page()
    title = f"Report: {Path(run_dir).name}"
    page.heading(title, 1)
    page.text(environment_line(meta))
    counts = Counter(frame["status"])
    page.text(
        "Cells: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + f". Rows: {rows_files_text(Path(run_dir))}."
        + (
            f" {frame.attrs['superseded']} row(s) of cells rerun since on changed code or weights are left out."
            if frame.attrs.get("superseded")
            else ""
        )
    )
    kinds = sorted(k for k in frame["mem_kind"].dropna().unique() if k in MEMORY_KINDS)
    page.text(
        "Memory: "
        + ("; ".join(f"{k}: {MEMORY_KINDS[k]}" for k in kinds) or "not measured")
        + ". 'mem ÷ model' divides the peak by the cost model's prediction (docs/estimators/index.md), "
        "with A = peak of one denoiser call with graph and S = one latent, both measured on the task. "
        "Times: median of the clean timed rounds (rounds slowed by other load are left out and repeated; "
        "'!' marks a row whose timing is suspect). '× full': the ratio to full's time over rounds run "
        "side by side, with its 95 % bootstrap interval for a single seed ('~': medians timed apart). "
        "'time ÷ model' divides by forwards·F + VJPs·V, with F and V measured on the task. Means over seeds."
    )
    phases = phases_table(frame)
    if phases is not None:
        page.heading("Where the time went")
        page.text(
            "Seconds per phase, summed over the ok cells; 'outside measurement' is the share of cell time "
            "in set-up, sample grids and the harness's own bookkeeping (everything but the reference, "
            "agreement, units, timing, memory, optimisation and evaluation)."
        )
        page.table(*phases)
    for (task, target), part in frame.groupby(["task", "target"], sort=False):
        page.heading(f"{task} · target {target}")
        cell_means = means[(means["task"] == task) & (means["target"] == target)]
        cell_curves = curves[(curves["task"] == task) & (curves["target"] == target)]
        if not cell_means.empty:
            fig = panel_figure(cell_means, cell_curves, f"{task} · target {target}")
            name = _slug(f"{task}-{target}")
            plots.save(fig, out / name, formats)
            page.image(f"{name}.png", f"{task} {target}")
            page.table(*comparison_table(cell_means))
            note = quality_note(cell_means)
            if note:
                page.text(note)
        grids = part[part["status"] == "ok"]
        if "samples_png" in grids:
            grids = grids.dropna(subset=["samples_png"]).sort_values(["steps", "seed"])
            grids = grids.drop_duplicates(subset=["estimator", "steps"]).sort_values(["estimator", "steps"])
            for r in grids.itertuples():
                source = Path(run_dir) / r.samples_png
                if source.is_file():
                    name = f"samples-{_slug(r.estimator)}-{r.steps}-{Path(r.samples_png).name}"
                    shutil.copyfile(source, out / name)
                    page.image(
                        name, f"{r.estimator} N={r.steps} seed {r.seed}: before (top) and after (bottom)", pixels=True
                    )
        bad = analysis.failures(part)
        page.items(
            [
                f"{r.estimator} N={r.steps} seed={r.seed}: {r.status}" + (f" ({r.why})" if r.why else "")
                for r in bad.itertuples()
            ]
        )
    page.write(out, title)
    return out
