"""shortcut-model: ShortFT's shortcut chain (arXiv 2507.22604; docs/estimators/index.md).

Backpropagate the reward through a frozen, distilled, trajectory-preserving K-step student in
place of the N-step chain. The student is the long model plus a distilled weight delta, so the
long model's trainable parameters (a reward LoRA), its conditioning and x_N all reach the short
chain's samples, and their gradient there is taken as the long chain's:

    g = d R(x_0^student(x_N, c, theta)) / d(x_N, c, theta),   x_0^student = K-step chain of student

The task gives the student: digits ships one (`python -m tasks.digits.shortcut --steps K`; its
transformer's, `python -m tasks.shortcut`), and sd, sdxl and sd3 take one by the `student` option
(a LoRA, a distilled checkpoint, or a folder `python -m tasks.shortcut` wrote). The gradient is
exact for the short chain and biased for the long one, by how far the student's chain departs from
the teacher's trajectory and how differently it responds to the leaves. How far it departs is
measured on each problem and written into the row (`student_traj_err`, tasks/shortcut/check.py);
past the task's bound (`student_bound`, a fraction of the undistilled K-step chain's error) the cell
is skipped. Memory K·A, time about K(F + V) with no
N-step pass at all: the short chain is the one sampled while tuning, and the long chain only
evaluates. Deterministic samplers only (eta 0: the student was distilled on the ODE)."""

from __future__ import annotations

import random

from bench.capabilities import FEW_STEP_BOUND, FEW_STEP_CHAIN
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop

CHECK = "shortcut-model:check"  # problem.extras: the trajectory check of each K, measured once
# Where a student comes from, for the message of a task without one
STUDENTS = (
    "digits (steps=4), toy (steps=1..64: its own model, not distilled), digits[model=transformer] "
    "(the shipped student's K), and sd, sdxl, sd3 with student=PATH (a LoRA, a distilled checkpoint, or "
    "a folder python -m tasks.shortcut wrote)"
)


class ShortcutModel(Estimator):
    name = "shortcut-model"
    plot_style = ("#911eb4", "<")  # colour and marker in every figure
    summary = "backprop through a distilled few-step student's K-step chain (ShortFT)"
    samples_long_chain = False  # its rewards are the student's; the runner evaluates the N-step chain
    needs = {FEW_STEP_CHAIN: "a distilled few-step student of the task's model"}
    options = (Option("steps", int, 4, "the student's step count K (one the task ships)", check=at_least(1)),)

    def check_task(self, task) -> None:
        shipped = task.offers().get(FEW_STEP_CHAIN, [])
        if self.steps not in shipped:
            listed = (
                f"{shipped[0]}..{shipped[-1]}"
                if len(shipped) > 2 and shipped == list(range(shipped[0], shipped[-1] + 1))
                else ", ".join(map(str, shipped))
            )
            have = f"it ships steps={listed}" if shipped else "it has no distilled student"
            raise SpecError(
                f"shortcut-model[steps={self.steps}] on {task.spec}: {have}; tasks with students: {STUDENTS}"
            )

    def skip_reason(self, problem: Problem) -> str | None:
        if FEW_STEP_CHAIN not in problem.extras:
            return (
                "the task's student follows its deterministic chain (eta 0; digits: the sampler, model, "
                "guidance and class it was distilled at); this problem's sampler, eta, model or guidance differs"
            )
        if problem.target == "noise":
            return "the short chain injects no noise; use target latent"
        bound = problem.extras.get(FEW_STEP_BOUND)
        check = self.trajectory_check(problem) if bound is not None else None
        if check is not None and not check["student_traj_err"] <= bound * check["student_plain_err"]:
            return (
                f"the {self.steps}-step student departs from the {problem.num_steps}-step chain: trajectory "
                f"error {check['student_traj_err']:.3g} > student_bound {bound:g} x {check['student_plain_err']:.3g} "
                f"(the undistilled {self.steps}-step chain's); use a student distilled for this task's model, "
                "sampler and guidance (python -m tasks.shortcut), or raise student_bound"
            )
        return None

    def trajectory_check(self, problem: Problem) -> dict:
        """How far the student's K-step chain departs from the problem's (tasks/shortcut/check.py),
        measured once per problem and K."""
        from tasks.shortcut.check import trajectory_error  # the check is the students' own, not the core's

        key = f"{CHECK}:{self.steps}"
        if key not in problem.extras:
            problem.extras[key] = trajectory_error(problem, problem.extras[FEW_STEP_CHAIN](self.steps))
        return problem.extras[key]

    def problem_fields(self, problem: Problem) -> dict:
        return self.trajectory_check(problem) if FEW_STEP_CHAIN in problem.extras else {}

    def cost(self, steps: int, target: str) -> Cost:
        return Cost(nfe_forward=self.steps, nfe_vjp=self.steps, memory="K·A", activations=self.steps)

    def unit_chain(self, problem: Problem):
        return problem.extras[FEW_STEP_CHAIN](self.steps)

    def estimate(self, problem: Problem, rng: random.Random) -> Estimate:
        chain = problem.extras[FEW_STEP_CHAIN](self.steps)  # built once per problem by the task
        state = (problem.x_start,)
        for i in range(chain.schedule.num_steps, 0, -1):
            state = chain.advance(state, i, problem.cond)
        return backprop(problem, state[0])
