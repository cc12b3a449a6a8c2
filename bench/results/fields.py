"""The fields of a row, declared once: name, unit and meaning. The summary, the report, compare
and the figures read their numeric columns from here, and the field table of docs/run-folders.md is
rendered from it (a test keeps the two equal: `python -m bench.cli.docs` rewrites it)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Field:
    name: str  # a row key, or a pattern with * (eval_*)
    unit: str  # "" for text and flags
    meaning: str
    numeric: bool = True


FIELDS: tuple[Field, ...] = (
    # identity
    Field("schema", "", "row format version", numeric=False),
    Field(
        "key",
        "",
        "content key of the cell: specs, target, N, seed, iters, device, hashes of the code the "
        "cell runs (the task with its sampler and reward, the estimator, the reference its agreement is "
        "measured against; docstrings and comments excluded), and `task_data` (a digest of the trained "
        "weights a task loads), so changed code, a changed helper it imports, or retrained weights never "
        "reuse a stale row; the measuring harness is in no key (`--remeasure`)",
        numeric=False,
    ),
    Field("task", "", "task spec, e.g. `digits[reward=ink]`", numeric=False),
    Field("task_version", "", "the task's version (bumped when its results change meaning)", numeric=False),
    Field(
        "task_code",
        "",
        "hash of the code of the task, of what it imports, and of the sampler and reward it resolves by name",
        numeric=False,
    ),
    Field("task_data", "", "digest of the data files (trained weights) the task loads", numeric=False),
    Field("estimator", "", "estimator spec, e.g. `truncated[k=2]`", numeric=False),
    Field("estimator_code", "", "hash of the code of the estimator and of what it imports", numeric=False),
    Field(
        "reference_code",
        "",
        "hash of the code of the reference estimator (`reference`), where agreement is measured",
        numeric=False,
    ),
    Field("options", "", "every option value of the estimator, defaults included", numeric=False),
    Field("target", "", "what is optimised: `latent`, `cond`, `weights`, `noise` or `gates`", numeric=False),
    Field("steps", "count", "sampler steps N"),
    Field("seed", "", "seed of the problem (initial latent, noises, adapters) and the estimator's draws"),
    Field("iters", "count", "Adam iterations of the short optimisation (at most, with `budget`)"),
    Field("budget", "s", "`--budget`: optimisation seconds per cell, present when given (part of the key)"),
    Field("device", "", "`cpu`, `cuda` or `cuda:N`", numeric=False),
    Field(
        "sampler",
        "",
        "the chain differentiated: the task's sampler (`ddim`, `dpmpp2m`, `flow-euler`, with its options), or `edict`",
        numeric=False,
    ),
    # outcome
    Field(
        "status",
        "",
        "`ok`, `skipped` (with `reason`), `diverged` (NaN/inf gradient or loss), `oom`, "
        "`timeout` (over `--timeout`), `error` (with `error`, `error_type`, `traceback`); one bad cell "
        "never stops a sweep",
        numeric=False,
    ),
    Field("reason", "", "why a cell was skipped", numeric=False),
    Field(
        "skip_kind",
        "",
        "`memory-limit`: skipped as predicted not to fit; a resumed sweep runs the cell again",
        numeric=False,
    ),
    Field("error", "", "first line of the error of a failed cell", numeric=False),
    Field("error_type", "", "the exception's class", numeric=False),
    Field("traceback", "", "the last frames of the traceback", numeric=False),
    # gradient agreement
    Field(
        "reference",
        "",
        "what the gradient is compared with: `full` backprop; for `edict`, backprop "
        "through its own chain; `checkpoint` where a stored graph does not fit; `off` or `none (...)` when "
        "no reference exists (a non-differentiable reward), and then no agreement figures",
        numeric=False,
    ),
    Field(
        "reference_dtype",
        "",
        "the reference's precision (float64 on the toy, digits and `sd[model=tiny]`)",
        numeric=False,
    ),
    Field("grad_cos", "cosine", "cosine between the estimator's gradient and the reference"),
    Field("grad_rel_err", "ratio", "‖g − g_ref‖ / ‖g_ref‖"),
    Field("grad_norm", "", "‖g‖ of the estimator's gradient"),
    Field("exact_grad_norm", "", "‖g_ref‖ of the reference gradient"),
    # time
    Field(
        "time_s",
        "s",
        "seconds per gradient: median of the clean timed rounds (device-synchronised; slowed rounds left out)",
    ),
    Field("time_iqr_s", "s", "interquartile range of the clean rounds"),
    Field("time_min_s", "s", "fastest clean round"),
    Field("time_rounds_s", "s", "every clean round, in order"),
    Field(
        "time_rounds_slowed",
        "count",
        "rounds left out (and repeated) because other processes took the cores the timing needed",
    ),
    Field("time_others_cores", "cores", "most cores other processes kept busy during a judged round"),
    Field(
        "timing_suspect",
        "",
        "why the time cannot be trusted (too few clean rounds; contention during rounds "
        "too short to judge one by one); absent when the timing was clean",
        numeric=False,
    ),
    Field(
        "time_stop",
        "",
        "what ended the timing: `rounds` (--rounds reached), `stable` (--stable reached), "
        "`cap` (--timing-cap), `retries` or `max_rounds`",
        numeric=False,
    ),
    Field(
        "time_paired",
        "",
        "true when the cell was timed round-robin with the other estimators of its point",
        numeric=False,
    ),
    Field("time_baseline", "", "the estimator the ratio below is taken to (--baseline, default `full`)", numeric=False),
    Field("time_vs_baseline", "ratio", "median time ÷ the baseline's, over rounds run in the same passes"),
    Field("time_vs_baseline_lo", "ratio", "lower end of its 95 % bootstrap interval (pairs of rounds resampled)"),
    Field("time_vs_baseline_hi", "ratio", "upper end of that interval"),
    Field("threads", "count", "torch intra-op threads of the timing (--threads)"),
    Field(
        "time_unit_f_s",
        "s",
        "F: one denoiser forward without graph, measured on the task's model and batch in the same passes as the cells",
    ),
    Field("time_unit_v_s", "s", "V: what one VJP adds (forward with graph + backward − F)"),
    Field(
        "time_unit_h_s",
        "s",
        "H: what running inside torch's non-reentrant checkpoint adds to a forward "
        "(graph recording through pack/unpack hooks), from a checkpointed forward and VJP: (that − F − (F + V)) / 2",
    ),
    Field("time_pred_s", "s", "the time model: `nfe_forward_pred`·F + `nfe_vjp_pred`·V + `time_pred_checkpointed`·H"),
    Field(
        "time_pred_checkpointed",
        "count",
        "forwards the cost model runs inside torch's checkpoint (first passes and replays)",
    ),
    # counts and the cost model
    Field("nfe_forward", "count", "denoiser forwards per gradient, counted"),
    Field("nfe_vjp", "count", "VJPs through the denoiser per gradient, counted"),
    Field("nfe_forward_pred", "count", "forwards the cost model predicts (docs/estimators/index.md)"),
    Field("nfe_vjp_pred", "count", "VJPs the cost model predicts"),
    # shortcut-model's student (tasks/shortcut/check.py)
    Field(
        "student_traj_err",
        "ratio",
        "shortcut-model: the student's trajectory error, from the problem's x_N the largest RMS(student "
        "state − N-step chain state) / RMS(N-step chain state) over the student's states at noise levels "
        "the N-step chain visits (x_0 always); past `student_bound` times `student_plain_err` the cell is skipped",
    ),
    Field("student_traj_points", "count", "shortcut-model: how many states that error compared"),
    Field(
        "student_plain_err",
        "ratio",
        "shortcut-model: the same error of the teacher's own undistilled K-step chain, for scale",
    ),
    # memory
    Field(
        "peak_mem_bytes",
        "bytes",
        "peak memory of one gradient call above what was held before it (`mem_kind` says which counter)",
    ),
    Field(
        "mem_kind",
        "",
        "`rss_peak` (a process forked per cell), `rss_peak_inprocess`, `cuda_max_allocated`, `off` or `unavailable`",
        numeric=False,
    ),
    Field("mem_error", "", "why the memory measurement failed", numeric=False),
    Field("mem_baseline_bytes", "bytes", "bytes the problem holds before any gradient (model, latent, conditioning)"),
    Field("mem_process_before_bytes", "bytes", "the measuring process's size before the call"),
    Field(
        "mem_reserved_peak_bytes",
        "bytes",
        "CUDA: `max_memory_reserved`, the caching allocator's peak (what nvidia-smi sees)",
    ),
    Field("mem_class", "", "the cost model's memory class, e.g. `N·A`", numeric=False),
    Field("mem_pred_activations", "count", "the class's coefficient of A"),
    Field("mem_pred_latents", "count", "the class's coefficient of S"),
    Field("mem_unit_a_bytes", "bytes", "A: peak of one denoiser call with its graph, measured like the cells"),
    Field("mem_unit_s_bytes", "bytes", "S: one latent"),
    Field("mem_pred_bytes", "bytes", "the memory model: `mem_pred_activations`·A + `mem_pred_latents`·S"),
    Field(
        "mem_plan_bytes",
        "bytes",
        "the planned peak above what is resident, from the cost model and units counted on the problem "
        "(bench/planner/live.py): latents·S + max(at reward·A + reward graph, activations·A + working·W)",
    ),
    Field("mem_plan_unit_a_bytes", "bytes", "A counted: what autograd keeps for one call, each storage once"),
    Field("mem_plan_unit_w_bytes", "bytes", "W counted: one call's working memory without a graph"),
    Field("mem_plan_reward_bytes", "bytes", "what the reward's graph keeps for x_0 (0 without a reward gradient)"),
    Field(
        "mem_fit_pred_bytes",
        "bytes",
        "the cell's predicted footprint: the problem's resident tensors, the gradient and `mem_plan_bytes`",
    ),
    Field("mem_fit_limit_bytes", "bytes", "the memory it was compared with (`--memory-limit`, or the device's free memory)"),
    # optimisation and quality
    Field("reward_init", "reward", "mean reward of the sampler's output before the optimisation"),
    Field("reward_final", "reward", "mean reward after it (evaluated outside the timed part)"),
    Field(
        "reward_curve",
        "reward",
        "mean reward of the N-step chain's samples at each iterate (iters_done + 1 "
        "points), or at those in `reward_curve_iter`",
    ),
    Field(
        "reward_curve_iter",
        "count",
        "the iterates of `reward_curve` where it is not every one (an estimator "
        "whose gradient pass samples another chain, e.g. shortcut-model, has the N-step chain evaluated "
        "apart, untimed, at 0, 1, 2, 4, 8, ... and every iters // 16-th)",
    ),
    Field("iters_done", "count", "Adam iterations run: iters, or fewer when `--budget` seconds ran out"),
    Field("reward_curve_s", "s", "optimisation wall-clock to reach each iterate (gradients and Adam steps only)"),
    Field("optim_seconds", "s", "optimisation wall-clock in all"),
    Field(
        "eval_*",
        "",
        "the task's evaluation of the optimised sampler, outside the timed part: `eval_reward`; "
        "on `digits` also `eval_held_out` (the `held_out` reward, never optimised, on the same samples), "
        "`eval_reward_fresh` and `eval_held_out_fresh` (both on the fresh samples of cond and weights), "
        "`eval_fid`, `eval_kid` (class-matched where the reward names a class), "
        "`eval_fid_samples`, `eval_accuracy`, `eval_diversity` (and `eval_clean_fid` with local Inception "
        "weights); on the `gates` target the deployed pruned sampler: `eval_pruned_<m>`, the static "
        "baselines `eval_deepcache<k>_<m>` and `eval_reuse<k>_<m>`, and `eval_unpruned_<m>`, with m in "
        "speedup (the unpruned pass's wall-clock over its own), time_s, flops_fraction, block_fraction, "
        "accuracy (conditioning class), fid, consistency_mse (to the unpruned samples)",
    ),
    Field("eval_*_init", "", "the same metric of the unoptimised sampler at the same point: the baseline"),
    Field(
        "eval_*_floor",
        "",
        "the metric between two halves of the real reference images (FID, KID): the "
        "best value samples could reach at that sample size",
    ),
    Field("eval_reference", "", "what FID and KID compare with, e.g. held-out digits of class 7", numeric=False),
    Field(
        "samples_png",
        "",
        "image tasks: `samples/<key>.png` in the run folder, the samples before (top row) "
        "and after (bottom row) the optimisation",
        numeric=False,
    ),
    # the harness
    Field(
        "phase_s",
        "s",
        "seconds of each phase of the cell: `setup`, `reference`, `agreement`, `units`, "
        "`timing` (its own rounds), `memory`, `optimise`, `evaluate`, `samples`, and `harness`: time between "
        "them (bookkeeping, its share of the timing loop's own cost, of waiting for the memory process and "
        "of its start); `harness` and `units` are shared work, not counted against `--timeout`",
    ),
    Field(
        "cell_seconds",
        "s",
        "the sum of the cell's phases: its wall time, where interleaved cells split the passes they share",
    ),
    Field(
        "remeasured",
        "",
        "`--remeasure`: what this row measured again (`time`, `memory`), its other "
        "fields kept from the cell's earlier row",
        numeric=False,
    ),
    Field(
        "job",
        "",
        "the job that wrote the row (`--launcher slurm` or `submitit-local`); absent for `local`",
        numeric=False,
    ),
    Field(
        "finished",
        "",
        "UTC time the row was written (ISO 8601); of two rows of a key, the later written "
        "wins: the later line in one file, the later time across files (a time more than 5 minutes in the "
        "future is not trusted; bench/results/store.py read_rows)",
        numeric=False,
    ),
)


def declared(name: str) -> Field | None:
    """The declaration of a row key (exact names first, then the most specific pattern)."""
    for field in FIELDS:
        if field.name == name:
            return field
    patterns = [f for f in FIELDS if "*" in f.name and fnmatch.fnmatchcase(name, f.name)]
    return max(patterns, key=lambda f: len(f.name), default=None)


def numeric_columns() -> list[str]:
    """Numeric scalar fields a frame of rows converts to numbers (patterns and lists excluded)."""
    lists = {"time_rounds_s", "reward_curve", "reward_curve_s", "reward_curve_iter", "phase_s"}
    return [f.name for f in FIELDS if f.numeric and "*" not in f.name and f.name not in lists]


def readme_table() -> str:
    lines = ["| field | unit | meaning |", "|---|---|---|"]
    lines += [f"| `{f.name}` | {f.unit} | {f.meaning} |" for f in FIELDS]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.results.fields: the table docs/run-folders.md shows
    print(readme_table())
