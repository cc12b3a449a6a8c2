"""python -m bench compare A B: per-cell ratios B / A of time and memory, matched on the readable
cell (task, target, estimator, N, seed), so runs of different commits compare.

A time change is flagged only when it exceeds the factor AND the timing spread does not explain
it: the interquartile ranges of the two cells' timed rounds do not overlap (asv compare's rule in
spirit: a ratio alone is not a change when the rounds scatter as much). With a single timed
round there is no spread, and the ratio alone decides (marked '?'); so it does, marked '?' and
named, where either side's timing is suspect (rounds slowed by other load). Memory is flagged on the
factor, above one page of resolution. A gradient whose cosine to the exact one moved by more
than 1e-3 is flagged too."""

from __future__ import annotations

import math

import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from bench.results import analysis
from bench.errors import SpecError

KEY = ["task", "target", "estimator", "steps", "seed"]
MEMORY_RESOLUTION = 64 * 1024


def _quartiles(rounds: Any) -> tuple[float, float] | None:
    if not isinstance(rounds, list) or len(rounds) < 2:
        return None
    q1, _, q3 = statistics.quantiles(rounds, n=4, method="inclusive")
    return q1, q3


def time_verdict(a: pd.Series, b: pd.Series, factor: float) -> str:
    """'slower', 'faster', '' (no change), each with '?' when no spread was recorded."""
    ratio = b["time_s"] / a["time_s"]
    if not (ratio > factor or ratio < 1 / factor):
        return ""
    word = "slower" if ratio > 1 else "faster"
    qa, qb = _quartiles(a.get("time_rounds_s")), _quartiles(b.get("time_rounds_s"))
    if qa is None or qb is None:
        return word + "?"
    overlap = qa[0] <= qb[1] and qb[0] <= qa[1]
    return "" if overlap else word


def compare(dir_a: Path, dir_b: Path, factor: float = 1.1) -> pd.DataFrame:
    if not (math.isfinite(factor) and factor > 1):
        raise SpecError(f"--factor must be a finite number > 1, got {factor}")
    a, _ = analysis.load_run(dir_a)
    b, _ = analysis.load_run(dir_b)
    a, b = a[a["status"] == "ok"], b[b["status"] == "ok"]
    merged = a.merge(b, on=KEY, suffixes=("_a", "_b"))
    if merged.empty:
        raise SpecError(f"no ok cell (task, target, estimator, N, seed) is in both {dir_a} and {dir_b}")
    records = []
    for _, row in merged.iterrows():
        side_a = pd.Series({k[:-2]: v for k, v in row.items() if k.endswith("_a")})
        side_b = pd.Series({k[:-2]: v for k, v in row.items() if k.endswith("_b")})
        flags = []
        verdict = time_verdict(side_a, side_b, factor)
        suspect = [side for side, r in (("A", side_a), ("B", side_b)) if isinstance(r.get("timing_suspect"), str)]
        if verdict:
            flags.append(f"time {verdict}" + ("?" if suspect and not verdict.endswith("?") else ""))
        if suspect:
            flags.append(f"timing suspect in {' and '.join(suspect)}")
        mem_a, mem_b = side_a.get("peak_mem_bytes"), side_b.get("peak_mem_bytes")
        mem_ratio = mem_b / mem_a if pd.notna(mem_a) and pd.notna(mem_b) and mem_a > 0 else float("nan")
        if (
            pd.notna(mem_ratio)
            and abs(mem_b - mem_a) > MEMORY_RESOLUTION
            and (mem_ratio > factor or mem_ratio < 1 / factor)
        ):
            flags.append("memory " + ("larger" if mem_ratio > 1 else "smaller"))
        if abs(side_b["grad_cos"] - side_a["grad_cos"]) > 1e-3:
            flags.append("gradient changed")
        records.append(
            {
                **{k: row[k] for k in KEY},
                "time_a": side_a["time_s"],
                "time_b": side_b["time_s"],
                "time_ratio": side_b["time_s"] / side_a["time_s"],
                "mem_a": mem_a,
                "mem_b": mem_b,
                "mem_ratio": mem_ratio,
                "cos_a": side_a["grad_cos"],
                "cos_b": side_b["grad_cos"],
                "vs_base_a": side_a.get("time_vs_baseline", float("nan")),
                "vs_base_b": side_b.get("time_vs_baseline", float("nan")),
                "flags": ", ".join(flags),
            }
        )
    return pd.DataFrame(records)


def _ratio(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.3f}"


def print_comparison(table: pd.DataFrame, console, only_changed: bool = False) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    shown = table[table["flags"] != ""] if only_changed else table
    tasks = ", ".join(dict.fromkeys(table["task"]))
    view = Table(
        title=escape(f"B / A per cell ({tasks})"),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    wide = console.width >= 120  # below that, the ratios only (times and cosines need 40 more columns)
    columns = ("cell", "ms A", "ms B", "B/A", "×base A", "×base B", "mem B/A", "cos A", "cos B", "change")
    shown_columns = [c for c in columns if wide or c not in ("ms A", "ms B", "cos A", "cos B")]
    for column in shown_columns:
        view.add_column(column, justify="left" if column in ("cell", "change") else "right", no_wrap=column != "change")
    for _, r in shown.iterrows():
        colour = (
            "red"
            if ("slower" in r["flags"] or "larger" in r["flags"] or "gradient" in r["flags"])
            else ("green" if r["flags"] else "")
        )
        flags = f"[{colour}]{escape(r['flags'])}[/]" if colour else ""
        memory = "-" if pd.isna(r["mem_ratio"]) else f"{r['mem_ratio']:.2f}"
        cells = dict(
            zip(
                columns,
                (
                    escape(f"{r['estimator']} {r['target']} N={r['steps']} s={r['seed']}"),
                    f"{r['time_a'] * 1e3:.1f}",
                    f"{r['time_b'] * 1e3:.1f}",
                    f"{r['time_ratio']:.2f}",
                    _ratio(r["vs_base_a"]),
                    _ratio(r["vs_base_b"]),
                    memory,
                    f"{r['cos_a']:.4f}",
                    f"{r['cos_b']:.4f}",
                    flags,
                ),
            )
        )
        view.add_row(*(cells[c] for c in shown_columns))
    console.print(view)
    changed = int((table["flags"] != "").sum())
    console.print(f"{len(table)} cells in both runs, {changed} changed beyond the factor and the spread")
