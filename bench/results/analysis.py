"""Rows to tables: everything a report, a comparison or a figure computes from a run folder.
Raw rows stay as written; every derived number is computed here, at report time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.results import fields, store
from bench.errors import SpecError

CELL = ["task", "target", "estimator", "steps"]  # a cell up to its seed
NUMERIC = [name for name in fields.numeric_columns() if name not in ("seed", "steps")]
DERIVED = [
    "reward_gain",
    "mem_over_pred",
    "time_over_pred",
    "fwd_over_pred",
    "vjp_over_pred",
    "harness_s",
    "harness_fraction",
]
MEASURED_PHASES = ("reference", "agreement", "units", "timing", "memory", "optimise", "evaluate")


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(rows as a frame with derived columns, run.json) of a run folder; SpecError if it is none."""
    run_dir = Path(run_dir)
    if not store.has_rows_files(run_dir):
        raise SpecError(
            f"{run_dir} is not a run folder (no {store.ROWS} and no {store.ROWS_DIR}/*.jsonl); "
            f"make one with: python -m bench run --out {run_dir}"
        )
    frame = store.load_frame(run_dir)
    if frame.empty:
        raise SpecError(f"{run_dir} holds no rows (in {store.ROWS} or {store.ROWS_DIR}/*.jsonl)")
    meta = store.read_run_json(run_dir) or {}
    derived = derive(frame)
    derived.attrs["superseded"] = frame.attrs.get("superseded", 0)
    return derived, meta


def derive(frame: pd.DataFrame) -> pd.DataFrame:
    numeric = NUMERIC + eval_columns(frame)
    text = ("reason", "error", "mem_kind", "mem_class", "timing_suspect", "time_baseline", "eval_reference")
    missing = {c: np.nan for c in dict.fromkeys(numeric) if c not in frame}
    missing.update({c: None for c in text if c not in frame})
    # the missing columns in one step (one insert per column fragments the frame)
    frame = pd.concat([frame, pd.DataFrame(missing, index=frame.index)], axis=1) if missing else frame.copy()
    numeric = list(dict.fromkeys(numeric))
    converted = frame[numeric].apply(pd.to_numeric, errors="coerce")
    frame = pd.concat([frame.drop(columns=numeric), converted], axis=1)[list(frame.columns)].copy()
    frame["family"] = frame["estimator"].str.split("[").str[0]
    frame["reward_gain"] = frame["reward_final"] - frame["reward_init"]
    frame["mem_over_pred"] = frame["peak_mem_bytes"] / frame["mem_pred_bytes"].where(frame["mem_pred_bytes"] > 0)
    frame["fwd_over_pred"] = frame["nfe_forward"] / frame["nfe_forward_pred"]
    frame["vjp_over_pred"] = frame["nfe_vjp"] / frame["nfe_vjp_pred"].replace(0, np.nan)
    frame["time_over_pred"] = frame["time_s"] / frame["time_pred_s"].where(frame["time_pred_s"] > 0)
    frame["suspect"] = frame["timing_suspect"].notna().astype(float)
    phases = frame["phase_s"] if "phase_s" in frame else pd.Series([None] * len(frame), index=frame.index)
    measured = phases.map(
        lambda p: sum(v for k, v in p.items() if k in MEASURED_PHASES) if isinstance(p, dict) else np.nan
    )
    cell = pd.to_numeric(frame["cell_seconds"], errors="coerce")
    frame["harness_s"] = cell - measured
    frame["harness_fraction"] = frame["harness_s"] / cell.where(cell > 0)
    return frame


def eval_columns(frame: pd.DataFrame) -> list[str]:
    """The task metrics present in a frame (eval_*, their _init baselines and _floor figures)."""
    return [c for c in frame.columns if c.startswith("eval_") and c != "eval_reference"]


def phase_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per cell of each phase, and the harness's share (cell time outside the
    measured phases: setup, sample grids, bookkeeping), per task and target (ok rows)."""
    ok = frame[(frame["status"] == "ok")]
    if "phase_s" not in ok or ok.empty:
        return pd.DataFrame()
    phases = pd.DataFrame([p if isinstance(p, dict) else {} for p in ok["phase_s"]], index=ok.index).fillna(0.0)
    phases["cell"] = pd.to_numeric(ok["cell_seconds"], errors="coerce")
    phases["harness"] = ok["harness_s"]
    table = phases.join(ok[["task", "target"]]).groupby(["task", "target"], sort=False).sum()
    table["harness_fraction"] = table["harness"] / table["cell"]
    return table.reset_index()


def cell_means(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per (task, target, estimator, N): means over the seeds of the ok rows, with the
    number of seeds, and ratios of time and memory to `full` at the same (task, target, N)."""
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=CELL + ["seeds"])
    numeric = [c for c in NUMERIC + eval_columns(ok) + DERIVED + ["suspect"] if c in ok]
    groups = ok.groupby(CELL, sort=False)
    means = groups[numeric].mean()
    means["seeds"] = groups.size()
    means["suspect"] = groups["suspect"].sum()
    for column in ("mem_class", "mem_kind", "time_baseline", "eval_reference"):
        means[column] = groups[column].first()
    means = means.reset_index()
    means["family"] = means["estimator"].str.split("[").str[0]
    compared = ["time_s", "peak_mem_bytes", "optim_seconds"]
    full = means.loc[means["estimator"] == "full", ["task", "target", "steps", *compared]]
    means = means.merge(full, on=["task", "target", "steps"], how="left", suffixes=("", "_full"))
    for column in compared:
        means[f"{column}_vs_full"] = means[column] / means.pop(f"{column}_full")
    # Where full was the baseline of paired timing, its ratio is the one of neighbouring rounds.
    paired = (means["time_baseline"] == "full") & means["time_vs_baseline"].notna()
    means["time_ratio_paired"] = paired
    means.loc[paired, "time_s_vs_full"] = means.loc[paired, "time_vs_baseline"]
    return means


def curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Long table of reward against optimisation iteration and seconds, one line per point
    (ok rows with a recorded curve)."""
    records = []
    for _, row in frame[frame["status"] == "ok"].iterrows():
        curve, seconds = row.get("reward_curve"), row.get("reward_curve_s")
        if not isinstance(curve, list):
            continue
        if not isinstance(seconds, list) or len(seconds) != len(curve):
            seconds = [np.nan] * len(curve)
        iterates = row.get("reward_curve_iter")
        if not isinstance(iterates, list) or len(iterates) != len(curve):
            iterates = range(len(curve))
        for iteration, reward, elapsed in zip(iterates, curve, seconds):
            records.append(
                {
                    **{k: row[k] for k in CELL},
                    "seed": row["seed"],
                    "iteration": iteration,
                    "reward": reward,
                    "seconds": elapsed,
                }
            )
    return pd.DataFrame(records, columns=CELL + ["seed", "iteration", "reward", "seconds"])


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that are not ok, with their reason or error."""
    bad = frame[frame["status"] != "ok"].copy()
    bad["why"] = bad["reason"].fillna(bad["error"]).fillna("")
    return bad[CELL + ["seed", "status", "why"]]
