"""The trajectory-preservation check: does the student's K-step chain pass where the problem's own
N-step chain passes?

From the problem's x_N and conditioning, both chains run without graph; at every state of the
student that sits at a noise level the N-step chain also visits (x_0 always; every state where the
K-step grid lies on the N-step one), the error is RMS(student - teacher) / RMS(teacher) over the
batch. The largest of them is the student's trajectory error. The same error of the teacher's own
K-step chain (the undistilled model on the student's grid) gives the scale: a student that does
not beat it has learnt nothing of the long chain."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.chain import Chain, Schedule


def state_level(schedule: Schedule, j: int) -> tuple[float, float]:
    """(alpha, sigma) of the state at grid point j < N: where step j + 1 lands (a DDIM step on a
    linspace grid lands beside the grid point, at alpha_bar_prev)."""
    landing = getattr(schedule, "alpha_bar_prev", ())
    if landing:
        return math.sqrt(landing[j]), math.sqrt(1.0 - landing[j])
    return schedule.alpha(j), schedule.sigma(j)


def shared_points(short: Schedule, long: Schedule) -> list[tuple[int, int]]:
    """(j, i): the states j < K of the short chain at the noise level of state i < N of the long one
    (equal to float32 rounding: schedulers keep their grids in float32)."""
    levels = [state_level(long, i) for i in range(long.num_steps)]

    def same(x: tuple[float, float], y: tuple[float, float]) -> bool:
        return all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(x, y))

    pairs = []
    for j in range(short.num_steps):
        i = next((i for i, level in enumerate(levels) if same(state_level(short, j), level)), None)
        if i is not None:
            pairs.append((j, i))
    return pairs


def relative_rms(x: Tensor, reference: Tensor) -> float:
    return float((x - reference).double().pow(2).mean().sqrt() / reference.double().pow(2).mean().sqrt())


@torch.no_grad()
def trajectory_error(problem, student_chain: Chain) -> dict[str, float | int]:
    """The student's largest relative RMS error against the problem's N-step chain over the shared
    states (`student_traj_err`), how many states were compared (`student_traj_points`), and the
    same error of the teacher's own K-step chain (`student_plain_err`). Counted on fresh counters:
    the problem's counts are not touched."""
    teacher = Chain(problem.chain.denoiser, problem.chain.schedule)
    student = Chain(student_chain.denoiser, student_chain.schedule)
    plain = Chain(problem.chain.denoiser, student_chain.schedule)
    n, k = teacher.schedule.num_steps, student.schedule.num_steps
    pairs = shared_points(student.schedule, teacher.schedule)
    _, reference = teacher.sample(problem.x_start, problem.cond, problem.noises, keep_states=True)

    def error(chain: Chain) -> float:
        _, states = chain.sample(problem.x_start, problem.cond, keep_states=True)  # x_i at [K - i]
        return max(relative_rms(states[k - j], reference[n - i]) for j, i in pairs)

    return {
        "student_traj_err": error(student),
        "student_traj_points": len(pairs),
        "student_plain_err": error(plain),
    }
