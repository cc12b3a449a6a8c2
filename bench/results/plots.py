"""Matplotlib panels shared by reports and paper figures, with one colour and marker per estimator
in every figure (a family's variants are shades of the family's colour)."""

from __future__ import annotations

import hashlib
import math
import re

import matplotlib

matplotlib.use("Agg")
# Labels come from rows (specs, task names): plain text, never mathtext ('$...$' must not parse).
matplotlib.rcParams["text.parse_math"] = False
# Byte-identical SVGs from identical rows: fixed ids, no date (git status stays clean).
matplotlib.rcParams["svg.hashsalt"] = "diffgrad-bench"
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

_SPARE = [mcolors.to_hex(c) for c in plt.get_cmap("tab20").colors]
_MARKERS = "o s D ^ v P X * h p d < >".split()
MIB = 2**20


def _stable(text: str) -> int:
    return int(hashlib.md5(text.encode()).hexdigest(), 16)


def family(spec: str) -> str:
    return spec.split("[")[0]


def family_style(name: str) -> tuple[str, str]:
    """(colour, marker) of an estimator family: the `plot_style` its class declares, else a pair
    that no registered estimator declares, chosen by its name (a plug-in, or a row's estimator
    that is not registered here)."""
    from bench.errors import SpecError
    from bench.registry import ESTIMATORS

    try:
        declared = ESTIMATORS.get(name).plot_style
    except SpecError:
        declared = None
    if declared:
        return declared
    taken = {ESTIMATORS.get(n).plot_style for n in ESTIMATORS.listed()}
    free = [(c, m) for c in _SPARE for m in _MARKERS if (c, m) not in taken]
    return free[_stable(name) % len(free)]


def colour(spec: str) -> str:
    """The estimator's colour: its family's, lightened for variants (by K for truncated)."""
    name = family(spec)
    base = family_style(name)[0]
    if spec == name:
        return base
    k = re.search(r"\bk=(\d+)", spec)
    if k:  # darker for small K, lighter for large K
        shade = min(0.7, 0.15 * math.log2(int(k.group(1))) + 0.05) if int(k.group(1)) > 1 else 0.0
    else:
        shade = (0.2, 0.35, 0.5, 0.65)[_stable(spec) % 4]
    rgb = np.array(mcolors.to_rgb(base))
    return mcolors.to_hex(rgb + (1 - rgb) * shade)


def marker(spec: str) -> str:
    return family_style(family(spec))[1]


def style(spec: str) -> dict:
    return {"color": colour(spec), "marker": marker(spec), "label": spec}


def order(specs) -> list[str]:
    """Estimators in a stable reading order: registered families in their listed order, then the rest."""
    from bench.registry import ESTIMATORS

    ranking = ESTIMATORS.listed()
    return sorted(set(specs), key=lambda s: (ranking.index(family(s)) if family(s) in ranking else 99, s))


def plain_log(ax, axis: str = "y") -> None:
    """Log scale with plain numbers at 1-2-5 steps instead of 10^k labels."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(ticker.NullFormatter())


def log_x_at(ax, values) -> None:
    """Log x axis with a labelled tick at exactly these values (step counts, K) and no others."""
    ticks = sorted(set(int(v) for v in values))
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.xaxis.set_minor_locator(ticker.NullLocator())


def lines_vs_steps(ax, means: pd.DataFrame, column: str, ylabel: str, log: bool = True, scale: float = 1.0) -> None:
    """One line per estimator: `column` (times scale) against the step count N."""
    for spec in order(means["estimator"]):
        part = means[means["estimator"] == spec].sort_values("steps")
        values = part[column] * scale
        if values.notna().any():
            ax.plot(part["steps"], values, linewidth=1.5, markersize=6, **style(spec))
    ax.set_xlabel("sampler steps N")
    ax.set_ylabel(ylabel)
    if log:
        log_x_at(ax, means["steps"])
        plain_log(ax, "y")
    else:  # a tick at each step count, as on the log axes (one N alone gave ticks at 3.8 ... 4.2)
        ticks = sorted(set(int(v) for v in means["steps"]))
        ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.grid(True, which="major", alpha=0.3)


def reward_curves(ax, curves: pd.DataFrame, x: str) -> None:
    """Mean reward over seeds against optimisation iteration or wall-clock seconds."""
    for spec in order(curves["estimator"]):
        part = curves[curves["estimator"] == spec].groupby("iteration")[["reward", "seconds"]].mean()
        ax.plot(
            part.index if x == "iteration" else part["seconds"],
            part["reward"],
            linewidth=1.5,
            markersize=4,
            **style(spec),
        )
    ax.set_xlabel("Adam iteration" if x == "iteration" else "optimisation wall-clock (s, gradients + steps)")
    ax.set_ylabel("mean reward")
    ax.grid(True, alpha=0.3)


def pareto(
    ax, means: pd.DataFrame, colour_by: str = "reward_gain", colour_label: str = "reward gain in the optimisation"
) -> None:
    """Memory against time per gradient, one point per estimator and N, coloured by reward; the
    non-dominated points (no other is both faster and smaller) joined by a dashed line."""
    data = means.dropna(subset=["time_s", "peak_mem_bytes"])
    if data.empty:
        ax.text(0.5, 0.5, "no memory measured", ha="center", va="center", transform=ax.transAxes)
        return
    values = data[colour_by]
    norm = mcolors.Normalize(values.min(), values.max()) if values.notna().any() else None
    for spec in order(data["estimator"]):
        part = data[data["estimator"] == spec]
        ax.scatter(
            part["time_s"] * 1e3,
            part["peak_mem_bytes"] / MIB,
            c=part[colour_by],
            cmap="viridis",
            norm=norm,
            marker=marker(spec),
            s=70,
            edgecolors=colour(spec),
            linewidths=1.8,
            zorder=3,
        )
        for _, row in part.iterrows():
            ax.annotate(
                f"{spec} N={row['steps']}",
                (row["time_s"] * 1e3, row["peak_mem_bytes"] / MIB),
                fontsize=6,
                xytext=(4, 3),
                textcoords="offset points",
                color="#333333",
            )
    front = data.sort_values(["time_s", "peak_mem_bytes"])
    best, points = math.inf, []
    for _, row in front.iterrows():
        if row["peak_mem_bytes"] < best:
            best = row["peak_mem_bytes"]
            points.append((row["time_s"] * 1e3, row["peak_mem_bytes"] / MIB))
    if len(points) > 1:
        ax.plot(*zip(*points), linestyle="--", color="#999999", linewidth=1, zorder=2, drawstyle="steps-post")
    if norm is not None:
        mappable = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        ax.figure.colorbar(mappable, ax=ax, label=colour_label)
    plain_log(ax, "x")
    plain_log(ax, "y")
    ax.set_xlabel("time per gradient (ms)")
    ax.set_ylabel("peak memory per gradient (MiB)")
    ax.grid(True, which="major", alpha=0.3)


def legend_below(fig, axes) -> None:
    """One legend for the whole figure, from every estimator drawn in any panel."""
    handles = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = order(handles)
    if labels:
        fig.legend(
            [handles[label] for label in labels],
            labels,
            loc="lower center",
            ncol=min(len(labels), 6),
            frameon=False,
            fontsize=9,
        )


def save(fig, path_without_suffix, formats=("png",)) -> list[str]:
    written = []
    for fmt in formats:
        target = f"{path_without_suffix}.{fmt}"
        metadata = {"Date": None} if fmt in ("svg", "pdf") else {"Software": None} if fmt == "png" else None
        fig.savefig(target, dpi=130 if fmt == "png" else None, bbox_inches="tight", metadata=metadata)
        written.append(target)
    plt.close(fig)
    return written


def tradeoff(ax, means: pd.DataFrame, quality: str, label: str) -> None:
    """Reward gain against the change of a quality metric (final − unoptimised, same point), one
    point per estimator and N: what DRaFT and DDPO report as reward bought against quality."""
    change = means[quality] - means.get(f"{quality}_init", np.nan)
    data = means.assign(change=change).dropna(subset=["reward_gain", "change"])
    if data.empty:
        ax.text(0.5, 0.5, f"no {quality} baseline in these rows", ha="center", va="center", transform=ax.transAxes)
        return
    for spec in order(data["estimator"]):
        part = data[data["estimator"] == spec]
        ax.scatter(
            part["reward_gain"], part["change"], marker=marker(spec), color=colour(spec), s=60, label=spec, zorder=3
        )
        for _, row in part.iterrows():
            ax.annotate(
                f"N={row['steps']}",
                (row["reward_gain"], row["change"]),
                fontsize=6,
                xytext=(4, 3),
                textcoords="offset points",
                color="#333333",
            )
    ax.axhline(0.0, color="#bbbbbb", linewidth=0.8)
    ax.axvline(0.0, color="#bbbbbb", linewidth=0.8)
    ax.set_xlabel("reward gain in the optimisation")
    ax.set_ylabel(f"{label} change (final − unoptimised; lower is better)")
    ax.grid(True, alpha=0.3)
