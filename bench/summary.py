"""The rich summary printed at the end of a sweep: one table per task and target, one line per
estimator and N (means over seeds), skip reasons and errors listed below, and status counts."""
from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Any

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


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(rows: list[dict[str, Any]], console: Console) -> None:
    tables: dict[tuple, dict[tuple, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        tables[(row["task"], row["target"])][(row["estimator"], row["steps"])].append(row)
    for (task, target), groups in tables.items():
        table = Table(title=escape(f"{task} · target {target}"), title_justify="left")
        table.add_column("estimator", overflow="fold", min_width=14)
        for column in ("N", "cos", "rel err", "ms/grad", "peak mem", "fwd/vjp", "reward"):
            table.add_column(column, justify="right", no_wrap=True)
        notes: dict[tuple, list[str]] = defaultdict(list)  # (estimator, status, text) -> cells
        for (estimator, steps), group in groups.items():
            ok = [row for row in group if row["status"] == "ok"]
            for row in group:
                if row["status"] != "ok":
                    text = row.get("reason") or row.get("error") or ""
                    notes[(estimator, row["status"], text)].append(f"N={steps} seed={row['seed']}")
            if not ok:
                table.add_row(escape(estimator), str(steps), *["" for _ in range(5)],
                              group[0]["status"])
                continue
            time_s = _mean(ok, "time_s")
            counts = f"{_fmt(_mean(ok, 'nfe_forward'), '.0f')}/{_fmt(_mean(ok, 'nfe_vjp'), '.0f')}"
            reward = f"{_fmt(_mean(ok, 'reward_init'), '.3g')}→{_fmt(_mean(ok, 'reward_final'), '.3g')}"
            table.add_row(escape(estimator), str(steps), _fmt(_mean(ok, "grad_cos"), ".4f"),
                          _fmt(_mean(ok, "grad_rel_err"), ".1e"), _fmt(time_s and time_s * 1e3, ".1f"),
                          format_bytes(_mean(ok, "peak_mem_bytes"),
                                       RSS_PAGE if ok[0].get("mem_kind") == "rss_peak" else 0), counts, reward)
        console.print(table)
        for (estimator, status, text), cells in notes.items():
            where = ", ".join(cells)
            console.print(f"  [dim]{escape(f'{estimator} {status} ({where}): {text}')}[/]")
    totals = Counter(row["status"] for row in rows)
    console.print("cells: " + ", ".join(f"{count} {status}" for status, count in sorted(totals.items())))
