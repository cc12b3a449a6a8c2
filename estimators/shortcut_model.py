"""shortcut-model: ShortFT's shortcut chain (arXiv 2507.22604; docs/estimators/index.md).

Backpropagate the reward through a frozen, distilled, trajectory-preserving K-step student in
place of the N-step chain. The student is the long model plus a distilled weight delta, so the
long model's trainable parameters (a reward LoRA), its conditioning and x_N all reach the short
chain's samples, and their gradient there is taken as the long chain's:

    g = d R(x_0^student(x_N, c, theta)) / d(x_N, c, theta),   x_0^student = K-step chain of student

The task ships the student (digits: `python -m tasks.digits.shortcut --steps K`). The gradient is
exact for the short chain and biased for the long one, by how far the student's chain departs from
the teacher's trajectory and how differently it responds to the leaves. Memory K·A, time about
K(F + V) with no N-step pass at all: the short chain is the one sampled while tuning, and the
long chain only evaluates. Deterministic DDIM only (the student was distilled on that ODE)."""

from __future__ import annotations

import random

from bench.capabilities import FEW_STEP_CHAIN
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import Problem
from estimators.base import Cost, Estimate, Estimator, backprop


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
                f"shortcut-model[steps={self.steps}] on {task.spec}: {have}; tasks with students: "
                "digits (steps=4), toy (steps=1..64: its own model, not distilled)"
            )

    def skip_reason(self, problem: Problem) -> str | None:
        if FEW_STEP_CHAIN not in problem.extras:
            return (
                "the task's student follows its deterministic chain (digits: DDIM on the epsilon model at "
                "the default guidance); this problem's sampler, eta, model or guidance differs"
            )
        if problem.target == "noise":
            return "the short chain injects no noise; use target latent"
        return None

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
