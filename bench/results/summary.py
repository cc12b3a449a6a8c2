"""The rich summary printed at the end of a sweep: one table per task and target, one line per
estimator and N (means over seeds), skip reasons, errors and suspect timings listed below, and
status counts."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def format_bytes(value: float | None, resolution: int = 0) -> str:
    """Human-readable bytes; values below the measurement's resolution (a page for RSS) say so."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if resolution and value < resolution:
        return f"<{format_bytes(resolution)}"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


RSS_PAGE = 4096


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(rows: list[dict[str, Any]], console: Console) -> None:
    """Means over seeds come from analysis.cell_means, like the report's. A time marked ! comes
    from a row whose timing is suspect (the reason is listed below the table); ×full is the ratio
    to full's time in rounds run side by side, with its 95 % interval where there were pairs."""
    from bench.results import analysis

    frame = analysis.derive(pd.DataFrame(rows))
    means = analysis.cell_means(frame)
    for (task, target), part in frame.groupby(["task", "target"], sort=False):
        table = Table(
            title=escape(f"{task} · target {target}"),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            collapse_padding=True,
            pad_edge=False,
        )
        wide = console.width >= 100  # the ratios' intervals need about 20 more columns
        table.add_column("estimator", no_wrap=True)
        for column in ("N", "cos", "ms/grad", "×full [95%]" if wide else "×full", "peak mem", "fwd/vjp", "reward"):
            table.add_column(column, justify="right", no_wrap=True)
        notes: dict[tuple, list[str]] = defaultdict(list)  # (estimator, status, text) -> cells
        cell_means = means[(means["task"] == task) & (means["target"] == target)] if not means.empty else means
        for (estimator, steps), group in part.groupby(["estimator", "steps"], sort=False):
            for row in group.itertuples():
                text = row.reason if row.status == "skipped" else row.error
                if row.status != "ok":
                    notes[(estimator, row.status, text or "")].append(f"N={steps} seed={row.seed}")
                elif isinstance(row.timing_suspect, str):
                    notes[(estimator, "timing suspect", row.timing_suspect)].append(f"N={steps} seed={row.seed}")
            found = cell_means[(cell_means["estimator"] == estimator) & (cell_means["steps"] == steps)]
            if found.empty:
                table.add_row(escape(estimator), str(steps), *["" for _ in range(5)], group["status"].iloc[0])
                continue
            r = found.iloc[0]
            time_ms = _fmt(r["time_s"] * 1e3, ".1f") + ("!" if r["suspect"] else "")
            counts = f"{_fmt(r['nfe_forward'], '.0f')}/{_fmt(r['nfe_vjp'], '.0f')}"
            reward = f"{_fmt(r['reward_init'], '.3g')}→{_fmt(r['reward_final'], '.3g')}"
            memory = format_bytes(_nan_none(r["peak_mem_bytes"]), RSS_PAGE if r["mem_kind"] == "rss_peak" else 0)
            table.add_row(
                escape(estimator),
                str(steps),
                _fmt(r["grad_cos"], ".4f"),
                time_ms,
                ratio_text(r, interval=wide),
                memory,
                counts,
                reward,
            )
        console.print(table)
        for (estimator, status, text), cells in notes.items():
            where = ", ".join(cells)
            console.print(f"  [dim]{escape(f'{estimator} {status} ({where}): {text}')}[/]")
    totals = Counter(row["status"] for row in rows)
    suspect = sum(1 for row in rows if row["status"] == "ok" and row.get("timing_suspect"))
    console.print(
        "cells: "
        + ", ".join(f"{count} {status}" for status, count in sorted(totals.items()))
        + (f" ({suspect} with suspect timing, marked !)" if suspect else "")
    )
    timed = [row for row in rows if row["status"] == "ok" and "time_s" in row]
    if timed:
        slowed = sum(row.get("time_rounds_slowed", 0) for row in timed)
        threads = sorted({row.get("threads") for row in timed if row.get("threads")})
        console.print(
            f"timing: {'/'.join(map(str, threads)) or '?'} thread(s); "
            + (
                f"{slowed} rounds slowed by other processes were left out and repeated"
                if slowed
                else "no round was slowed by other processes"
            )
            + "; ×full: ratio over rounds run side by side (95 % intervals on a terminal of 100 "
            "columns or more), ~ where timed apart"
        )


def _nan_none(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def ratio_text(r: Any, interval: bool = True) -> str:
    """Time ÷ full's: paired, with its interval ('0.52 [0.50–0.55]'), or of medians timed apart ('0.52~')."""
    value = _nan_none(r.get("time_s_vs_full"))
    if value is None:
        return "-"
    if r.get("estimator") == "full":
        return "1"
    if not r.get("time_ratio_paired"):
        return f"{value:.2f}~"
    lo, hi = _nan_none(r.get("time_vs_baseline_lo")), _nan_none(r.get("time_vs_baseline_hi"))
    shown = interval and lo is not None and hi is not None and r["seeds"] == 1
    return f"{value:.2f}" + (f" [{lo:.2f}-{hi:.2f}]" if shown else "")
