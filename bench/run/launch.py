"""Where a sweep's cells run, a table of launchers (LAUNCHERS) that bench/run/execute.py's one loop
hands the work to: `local` (this process, bench/run/points.py's run_cells), or jobs through submitit:
`submitit-local` (processes on this machine) and `slurm` (a SLURM job array). On the submitting
side a launcher reports through events (Event: start, point, row, progress, note, warning) to one
callback, and prints nothing.

A job runs a list of cells (by default one point's, so they are timed side by side) and appends
each cell's row to its own file, OUT/rows.d/<job id>.jsonl: jobs on different nodes never share a
file, a lock or an append, which network filesystems do not make safe. Reading a run folder merges
those files with rows.jsonl (latest row per key, bench/results/store.py). While a job works on a point it
keeps a claim, OUT/rows.d/<job id>.claim.json, whose modification time it refreshes every
HEARTBEAT_S: a job the scheduler kills (time limit, preemption, node failure) leaves no row for the
cell it was in and a claim that goes stale, so that cell counts as missing and the same command
reruns it, and only it. OUT/jobs.jsonl records every submitted job and its cells; OUT/jobs/ holds
submitit's scripts and logs.

On CUDA each cell still runs in its own process inside its job (`--isolate auto`), so a cell's
peak memory comes from an allocator no other cell used."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from bench.results import store
from bench.errors import SpecError
from bench.run.guard import die_with_parent
from bench.results.jobs import (  # the job records' readers, importable from here as before bench/results/jobs.py
    HEARTBEAT_S,
    JOBS,
    JOBS_DIR,
    SLURM_LIVE,
    STALE_S,
    _process_start,
    busy_cells,
    claims,
    job_state,
    submitted,
)


@dataclass
class LaunchSpec:
    launcher: str = "local"
    partition: str = ""  # SLURM partition ("" : the cluster's default)
    time_min: int = 60  # time limit of one job, minutes
    gpus_per_job: int = 0
    cpus_per_job: int = 0  # 0: the sweep's --threads if given, else 1 on a CPU and 4 on CUDA
    array_parallelism: int = 0  # jobs running at once (0: SLURM's array default; locally, the cores / cpus per job)
    cells_per_job: int = 0  # 0: one point's cells per job (timed side by side)
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra sbatch parameters, e.g. {"account": "lab"}
    detach: bool = False  # submit and return; `python -m bench status OUT` watches

    @classmethod
    def build(cls, values: dict[str, Any]) -> "LaunchSpec":
        spec = cls()
        for name, value in values.items():
            default = getattr(spec, name)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = isinstance(value, type(default))
            if not ok:
                kind = {
                    bool: "true or false",
                    int: "an integer >= 0",
                    str: "a string",
                    dict: "a table of sbatch parameters",
                }[type(default)]
                raise SpecError(f"launcher option {name} must be {kind}, got {value!r}")
            setattr(spec, name, value)
        for name in ("launcher", "partition"):
            check_script_text(f"launcher option {name}", getattr(spec, name))
        spec.sbatch = check_sbatch(spec.sbatch)
        if spec.launcher not in LAUNCHERS:
            raise SpecError(f"unknown launcher {spec.launcher!r}; valid: {', '.join(LAUNCHERS)}")
        takes = LAUNCHERS[spec.launcher].takes
        given = [name for name in SLURM_OPTIONS if getattr(spec, name) and name not in takes]
        if given:
            raise SpecError(f"{given[0]} is an option of --launcher slurm, not {spec.launcher}")
        given = [name for name in JOB_OPTIONS if getattr(spec, name) != getattr(cls(), name) and name not in takes]
        if given:
            raise SpecError(
                f"{given[0]} is an option of the job launchers (--launcher submitit-local or slurm), "
                f"not of {spec.launcher}"
            )
        if spec.time_min < 1:
            raise SpecError(f"--time-min must be at least 1 minute, got {spec.time_min}")
        return spec

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


JOB_OPTIONS = ("gpus_per_job", "cpus_per_job", "array_parallelism", "cells_per_job", "detach")
SLURM_OPTIONS = ("partition", "sbatch")

SBATCH_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_script_text(what: str, text: str) -> None:
    """SpecError unless `text` can go into a line of the job script as it is: no control character
    (a newline would end the line and start a directive of its own)."""
    bad = next((c for c in text if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise SpecError(
            f"{what} {text!r} holds a control character (U+{ord(bad):04X}); each becomes part of a "
            "line of the sbatch script, which a newline would end"
        )


def check_sbatch(params: dict[str, Any]) -> dict[str, Any]:
    """Extra sbatch parameters (from --sbatch or a sweep file's [launcher] sbatch table): each key an
    sbatch long option (letters, digits, '-' and '_'), each value a string without control
    characters, a number or true. Keys are given with '_' for '-', as submitit expects."""
    checked = {}
    for key, value in params.items():
        if not isinstance(key, str) or not SBATCH_KEY.fullmatch(key):
            raise SpecError(
                f"sbatch parameter {key!r}: a key is an sbatch option's name (letters, digits, '-' "
                "and '_'), e.g. account or mail-type"
            )
        if not (value is True or isinstance(value, (str, int, float)) and not isinstance(value, bool)):
            raise SpecError(f"sbatch parameter {key}: the value must be a string, a number or true, got {value!r}")
        if isinstance(value, str):
            check_script_text(f"sbatch parameter {key}", value)
        checked[key.replace("-", "_")] = value
    return checked


def parse_sbatch(items: list[str]) -> dict[str, str]:
    """--sbatch KEY=VALUE (repeatable) as a dict; KEY is sbatch's long option without dashes
    (LaunchSpec.build checks keys and values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise SpecError(f"--sbatch expects KEY=VALUE (an sbatch option, e.g. account=mylab), got {item!r}")
        out[key] = value.strip()
    return out


# -- the job's side --------------------------------------------------------------------------


def job_id() -> str:
    """This job's id as its scheduler names it (array jobs: ARRAY_TASK), or the process's."""
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not inside a submitit job
        return f"pid{os.getpid()}"


class Claim:
    """OUT/rows.d/<job>.claim.json: the cells a job is working on, refreshed every HEARTBEAT_S."""

    def __init__(self, out: Path, job: str) -> None:
        self.path = out / store.ROWS_DIR / f"{job}.claim.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.job = job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def hold(self, keys: list[str]) -> None:
        record = {
            "job": self.job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "cells": keys,
            "since": store.now(),
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)
        if not self._thread.is_alive():
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def die_with_controller() -> None:
    """Under submitit's local executor: end this task when its controller ends.

    A local job is two processes: the controller (`python -m submitit.local._local`; its pid is the
    job id, which the submitting side watches) and this task, its child. Killed alone, the
    controller would leave the task running on as an orphan that writes its rows after the
    submitting side has reported them missing. So the kernel is asked to SIGKILL this process when
    its parent ends (Linux prctl PR_SET_PDEATHSIG; elsewhere a thread watches the parent pid),
    and a task whose controller has already ended stops here. Not on SLURM: there the parent is
    slurmstepd, which ends its job's processes itself, and PDEATHSIG fires when the parent
    *thread* that forked the task ends, which a multithreaded daemon does not promise to outlive
    it (the local controller forks from its only thread)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return
    controller = os.getppid()
    if not os.environ.get("SUBMITIT_LOCAL_WITH_SHELL"):  # no set-up shell: the controller's pid is the job id
        controller = int(os.environ.get("SUBMITIT_LOCAL_JOB_ID", controller))
    watched = die_with_parent()  # False where not Linux
    if os.getppid() != controller:  # it ended before the kernel was asked
        _controller_gone(controller)
    if not watched:
        threading.Thread(target=_watch_parent, args=(controller,), daemon=True).start()


def _watch_parent(controller: int) -> None:
    while os.getppid() == controller:
        time.sleep(0.2)
    _controller_gone(controller)


def _controller_gone(controller: int) -> None:
    """End as PDEATHSIG would: SIGKILL, which no handler or patched os._exit (bench/run/guard.py) delays."""
    print(f"this job's controller (pid {controller}) has ended; the task stops without writing rows", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def run_job(spec_fields: dict[str, Any], out: str, keys: list[str], force: bool = False) -> dict[str, int]:
    """A job: run the cells `keys` of the sweep part `spec_fields` that have no row yet (all of
    them with force), appending their rows to OUT/rows.d/<job id>.jsonl. Returns counts by status."""
    die_with_controller()
    from bench.run.plan import SweepSpec, plan
    from bench.run.points import run_cells

    folder = Path(out)
    job = job_id()
    spec = SweepSpec(**spec_fields)
    ((_, cells),) = plan([spec])
    wanted = set(keys)
    cells = [cell for cell in cells if cell.key in wanted]
    if len(cells) != len(wanted):  # the code changed after submission: those keys no longer exist
        print(
            f"{len(wanted) - len(cells)} of this job's {len(wanted)} cells have other keys with the code as it "
            "is now; they stay pending and the same command submits them under their new keys",
            flush=True,
        )
    rows_path = folder / store.ROWS_DIR / f"{job}.jsonl"
    store.repair(rows_path)  # a requeued job (same id) killed mid-write: cut its torn line
    claim = Claim(folder, job)
    counts: dict[str, int] = {}
    try:

        def write(row: dict[str, Any]) -> None:
            row["job"] = job
            store.append_row(rows_path, row)
            counts[row["status"]] = counts.get(row["status"], 0) + 1

        run_cells(
            spec,
            folder,
            cells,
            done=store.latest_by_key(store.read_rows(folder)),
            force=force,
            write=write,
            on_point=lambda waiting: claim.hold([c.key for c in waiting]),
        )
    finally:
        claim.release()
    return counts


# -- the submitting side --------------------------------------------------------------------


def chunks(cells: list[Any], per_job: int) -> list[list[Any]]:
    """Cells into jobs: one point per job (per_job 0), or per_job cells at a time in sweep order."""
    if per_job:
        return [cells[i : i + per_job] for i in range(0, len(cells), per_job)]
    points: dict[tuple, list[Any]] = {}
    for cell in cells:
        points.setdefault(cell.point, []).append(cell)
    return list(points.values())


def make_executor(launch: LaunchSpec, out: Path, threads: int):
    """submitit's executor for the launcher, or a one-line SpecError saying why there is none."""
    try:
        import submitit
    except ImportError:
        raise SpecError(
            f"--launcher {launch.launcher} needs submitit (pip install submitit); --launcher local runs without it"
        ) from None
    folder = out / JOBS_DIR / "%j"
    cpus = launch.cpus_per_job or threads
    if launch.launcher == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise SpecError(
                f"--launcher slurm needs SLURM, but {' and '.join(missing)} is not on this machine's "
                "PATH; use --launcher local, or --launcher submitit-local for jobs on this machine"
            )
        executor = submitit.SlurmExecutor(folder=folder)
        params: dict[str, Any] = {
            "time": launch.time_min,
            "cpus_per_task": cpus,
            "job_name": "bench",
            "additional_parameters": dict(launch.sbatch),
        }
        if launch.partition:
            params["partition"] = launch.partition
        if launch.gpus_per_job:
            params["gpus_per_node"] = launch.gpus_per_job
        if launch.array_parallelism:
            params["array_parallelism"] = launch.array_parallelism
        executor.update_parameters(**params)
        return executor
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=launch.time_min, gpus_per_node=launch.gpus_per_job)
    return executor


def local_parallelism(launch: LaunchSpec, threads: int) -> int:
    if launch.array_parallelism:
        return launch.array_parallelism
    return max(1, (os.cpu_count() or 1) // max(1, launch.cpus_per_job or threads or 1))


def submit_jobs(
    executor,
    plan: list[tuple[Any, list[Any]]],
    out: Path,
    launch: LaunchSpec,
    threads: int,
    force: bool,
    on_poll: Callable[[], None] | None = None,
) -> list[Any]:
    """Submit every chunk of every part; record each job in OUT/jobs.jsonl. Local jobs beyond the
    parallelism wait here for a free slot (submitit's local executor has no queue of its own)."""
    work = [(spec, chunk) for spec, cells in plan for chunk in chunks(cells, launch.cells_per_job)]
    jobs: list[Any] = []

    def record(job, chunk) -> None:
        entry = {
            "job": str(job.job_id),
            "launcher": launch.launcher,
            "submitted": store.now(),
            "host": socket.gethostname(),
            "cells": [c.key for c in chunk],
        }
        if launch.launcher != "slurm":
            entry["pid"] = int(job.job_id)
            entry["pid_start"] = _process_start(entry["pid"])
        with open(out / JOBS, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    if launch.launcher == "slurm":
        try:
            with executor.batch():  # one job array
                pending = [
                    (executor.submit(run_job, asdict(spec), str(out), [c.key for c in chunk], force), chunk)
                    for spec, chunk in work
                ]
        except Exception as exc:  # sbatch refused: a bad partition, account, time limit...
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise SpecError(f"sbatch refused the job array: {lines[-1] if lines else type(exc).__name__}") from None
        for job, chunk in pending:
            record(job, chunk)
            jobs.append(job)
        return jobs
    slots = local_parallelism(launch, threads)
    gpus = _local_gpus() if launch.gpus_per_job else []
    if launch.gpus_per_job:
        if len(gpus) < launch.gpus_per_job:
            raise SpecError(f"--gpus-per-job {launch.gpus_per_job}, but this machine shows {len(gpus)} GPU(s)")
        slots = min(slots, len(gpus) // launch.gpus_per_job)
    held: dict[int, list[int]] = {}  # job index -> the GPUs it was given
    for spec, chunk in work:
        while sum(not job.done() for job in jobs) >= slots:
            if on_poll:
                on_poll()
            time.sleep(0.5)
        if launch.gpus_per_job:  # each running job gets GPUs of its own (CUDA_VISIBLE_DEVICES)
            busy = {g for index, given in held.items() if not jobs[index].done() for g in given}
            given = [g for g in gpus if g not in busy][: launch.gpus_per_job]
            executor.update_parameters(visible_gpus=given)
            held[len(jobs)] = given
        job = executor.submit(run_job, asdict(spec), str(out), [c.key for c in chunk], force)
        # submitit waits 15 s for a result a slow network filesystem may not show yet; a local job's
        # task has written its result (or never will) once its controller has ended
        job._results_timeout_s = 0
        record(job, chunk)
        jobs.append(job)
    return jobs


def _local_gpus() -> list[int]:
    """The GPUs this process may use, as numbers for a job's CUDA_VISIBLE_DEVICES: this process's
    own CUDA_VISIBLE_DEVICES if set (a job given "0" would otherwise see the machine's GPU 0)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [item.strip() for item in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
    if not visible:
        return list(range(count))
    if not all(item.isdigit() for item in visible):
        raise SpecError(
            "--gpus-per-job with submitit-local needs CUDA_VISIBLE_DEVICES as numbers, got "
            f"{os.environ['CUDA_VISIBLE_DEVICES']!r}"
        )
    return [int(item) for item in visible][:count]


def wait(jobs: list[Any], poll_s: float = 1.0, on_poll: Callable[[], None] | None = None) -> list[str]:
    """Wait for every job; the failures (a job that raised, was killed or timed out) as lines."""
    while not all(job.done() for job in jobs):
        if on_poll:
            on_poll()
        time.sleep(poll_s)
    failures = []
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError
            text = str(exc).strip().splitlines()
            failures.append(f"job {job.job_id}: {type(exc).__name__}: {text[-1] if text else ''}")
    return failures


# -- the launchers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """What a sweep reports as it goes, to one callback (the CLI draws its bar and lines from them):
    start (total, reused), point (cells: a point's waiting cells, as this process starts them),
    row (row: a cell's new row), progress (completed, total), note (text), warning (text, reason:
    held, job-failed, missing; missing also has count)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.data[name]


def _fingerprint(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=str)  # NaN, unequal to itself, prints the same


class Tally:
    """The sweep's progress: the cells handed to the launcher (`wanted`), the rows they had before,
    and the new rows reported so far, each once and as a row event then a progress event."""

    def __init__(
        self,
        order: list[str],
        wanted: set[str],
        done: dict[str, dict[str, Any]],
        total: int,
        emit: Callable[[Event], None],
    ) -> None:
        self.order, self.wanted, self.total, self.emit = order, wanted, total, emit
        self.before = {k: _fingerprint(done[k]) for k in wanted if k in done}
        self.completed = total - len(wanted)
        self.reported: set[str] = set()

    def row(self, row: dict[str, Any]) -> None:
        if row["key"] in self.wanted and row["key"] not in self.reported:
            self.reported.add(row["key"])
            self.completed += 1
        self.emit(Event("row", {"row": row}))
        self.emit(Event("progress", {"completed": self.completed, "total": self.total}))

    def written(self, rows: dict[str, dict[str, Any]]) -> set[str]:
        """The wanted cells whose latest row is not the one they had before the launcher started:
        by content, not by clock (a node's clock may be ahead or behind)."""
        return {k for k in self.wanted if k in rows and _fingerprint(rows[k]) != self.before.get(k)}

    def poll(self, rows: dict[str, dict[str, Any]]) -> None:
        """Report the rows that others (jobs) wrote since the last poll, in the sweep's order."""
        new = self.written(rows) - self.reported
        for key in (k for k in self.order if k in new):
            self.row(rows[key])


class Launcher:
    """A table entry of LAUNCHERS. Made under the run folder's lock before anything is written to it
    (a launcher that cannot run here refuses then, with a one-line SpecError); run(...) runs the
    work, a list of (part, its cells to run), reporting through tally, and returns the rows by key,
    or None when it returns before the cells are done (detached, stopped waiting)."""

    name = ""
    help = ""
    takes: tuple[str, ...] = ()  # LaunchSpec's options of the job launchers it accepts
    in_process = False  # runs the cells in this process (what --remeasure needs)

    def __init__(self, launch: LaunchSpec, out: Path, parts: list[tuple[Any, list[Any]]]) -> None:
        self.launch, self.out = launch, out

    def held(self, count: int, jobs: list[str]) -> Event:
        """The one event that says the cells live jobs hold are left to them."""
        return Event(
            "warning",
            {
                "reason": "held",
                "text": f"{count} cell(s) are held by live job(s) {', '.join(jobs)} and are left to them; "
                f"see python -m bench status {self.out}",
            },
        )

    def run(self, work, done, kept, remeasure, force, tally: Tally) -> dict[str, dict[str, Any]] | None:
        raise NotImplementedError


class Local(Launcher):
    name = "local"
    help = "every cell in this process, one after the other (the default)"
    in_process = True

    def run(self, work, done, kept, remeasure, force, tally):
        from bench.run.points import run_cells

        rows_path = self.out / store.ROWS

        def write(row: dict[str, Any]) -> None:
            store.append_row(rows_path, row)
            tally.row(row)

        for spec, cells in work:
            run_cells(
                spec,
                self.out,
                cells,
                done,
                True,
                write,
                lambda waiting: tally.emit(Event("point", {"cells": waiting})),
                kept=kept,
                remeasure=remeasure,
            )
        return done


class SubmititLocal(Launcher):
    name = "submitit-local"
    help = "jobs as processes on this machine through submitit's local executor (at most --array-parallelism at once)"
    takes = JOB_OPTIONS

    def __init__(self, launch: LaunchSpec, out: Path, parts: list[tuple[Any, list[Any]]]) -> None:
        super().__init__(launch, out, parts)
        first = parts[0][0]
        self.threads = first.threads or (1 if first.device == "cpu" else 4)  # cores a job asks for by default
        self.executor = make_executor(launch, out, self.threads)  # no SLURM here: one line, nothing written

    def held(self, count: int, jobs: list[str]) -> Event:
        text = f"{count} cells are queued or running in live jobs ({', '.join(jobs)}); not submitted again"
        return Event("note", {"text": text})

    def run(self, work, done, kept, remeasure, force, tally):
        out, launch = self.out, self.launch

        def poll() -> None:
            tally.poll(store.latest_by_key(store.read_rows(out)))

        jobs = submit_jobs(self.executor, work, out, launch, self.threads, force, poll)
        if jobs:
            tally.emit(
                Event(
                    "note",
                    {
                        "text": f"submitted {len(jobs)} job(s) through {launch.launcher}: "
                        f"{', '.join(str(j.job_id) for j in jobs[:8])}{' ...' if len(jobs) > 8 else ''}; "
                        f"logs under {out / JOBS_DIR}"
                    },
                )
            )
        if launch.detach:
            text = (
                f"detached: watch with `python -m bench status {out}`; run the same command "
                "again to submit the cells that end without a row"
            )
            tally.emit(Event("note", {"text": text}))
            return None
        try:
            failures = wait(jobs, on_poll=poll)
        except KeyboardInterrupt:  # the jobs are not this process's children to stop
            text = (
                f"stopped waiting; the jobs keep running: watch with `python -m bench status {out}`, "
                "cancel them with your scheduler (scancel) or by their process ids in jobs.jsonl"
            )
            tally.emit(Event("note", {"text": text}))
            return None
        poll()
        for line in failures:
            tally.emit(Event("warning", {"reason": "job-failed", "text": line}))
        return store.latest_by_key(store.read_rows(out))


class Slurm(SubmititLocal):
    name = "slurm"
    help = "a SLURM job array through submitit (sbatch; --partition, --time-min, --gpus-per-job, ...)"
    takes = JOB_OPTIONS + SLURM_OPTIONS


LAUNCHERS: dict[str, type[Launcher]] = {launcher.name: launcher for launcher in (Local, SubmititLocal, Slurm)}
