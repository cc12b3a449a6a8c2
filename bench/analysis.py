"""Rows to tables: everything a report, a comparison or a figure computes from a run folder.
Raw rows stay as written; every derived number is computed here, at report time."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import store
from bench.errors import SpecError

CELL = ["task", "target", "estimator", "steps"]  # a cell up to its seed
NUMERIC = ["time_s", "time_iqr_s", "peak_mem_bytes", "mem_pred_bytes", "mem_baseline_bytes",
           "nfe_forward", "nfe_vjp", "nfe_forward_pred", "nfe_vjp_pred", "grad_cos", "grad_rel_err",
           "reward_init", "reward_final", "eval_fid", "optim_seconds"]


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(rows as a frame with derived columns, run.json) of a run folder; SpecError if it is none."""
    run_dir = Path(run_dir)
    if not (run_dir / store.ROWS).is_file():
        raise SpecError(f"{run_dir} is not a run folder (no {store.ROWS}); "
                        f"make one with: python -m bench run --out {run_dir}")
    frame = store.load_frame(run_dir)
    if frame.empty:
        raise SpecError(f"{run_dir / store.ROWS} holds no rows")
    meta = store.read_run_json(run_dir) or {}
    return derive(frame), meta


def derive(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in NUMERIC:
        if column not in frame:
            frame[column] = np.nan
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("reason", "error", "mem_kind", "mem_class"):
        if column not in frame:
            frame[column] = None
    frame["family"] = frame["estimator"].str.split("[").str[0]
    frame["reward_gain"] = frame["reward_final"] - frame["reward_init"]
    frame["mem_over_pred"] = frame["peak_mem_bytes"] / frame["mem_pred_bytes"].where(frame["mem_pred_bytes"] > 0)
    frame["fwd_over_pred"] = frame["nfe_forward"] / frame["nfe_forward_pred"]
    frame["vjp_over_pred"] = frame["nfe_vjp"] / frame["nfe_vjp_pred"].replace(0, np.nan)
    return frame


def cell_means(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per (task, target, estimator, N): means over the seeds of the ok rows, with the
    number of seeds, and ratios of time and memory to `full` at the same (task, target, N)."""
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=CELL + ["seeds"])
    numeric = NUMERIC + ["reward_gain", "mem_over_pred", "fwd_over_pred", "vjp_over_pred"]
    means = ok.groupby(CELL, sort=False)[numeric].mean()
    means["seeds"] = ok.groupby(CELL, sort=False).size()
    means["mem_class"] = ok.groupby(CELL, sort=False)["mem_class"].first()
    means["mem_kind"] = ok.groupby(CELL, sort=False)["mem_kind"].first()
    means = means.reset_index()
    means["family"] = means["estimator"].str.split("[").str[0]
    compared = ["time_s", "peak_mem_bytes", "optim_seconds"]
    full = means.loc[means["estimator"] == "full", ["task", "target", "steps", *compared]]
    means = means.merge(full, on=["task", "target", "steps"], how="left", suffixes=("", "_full"))
    for column in compared:
        means[f"{column}_vs_full"] = means[column] / means.pop(f"{column}_full")
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
        for iteration, (reward, elapsed) in enumerate(zip(curve, seconds)):
            records.append({**{k: row[k] for k in CELL}, "seed": row["seed"], "iteration": iteration,
                            "reward": reward, "seconds": elapsed})
    return pd.DataFrame(records, columns=CELL + ["seed", "iteration", "reward", "seconds"])


def failures(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that are not ok, with their reason or error."""
    bad = frame[frame["status"] != "ok"].copy()
    bad["why"] = bad["reason"].fillna(bad["error"]).fillna("")
    return bad[CELL + ["seed", "status", "why"]]
