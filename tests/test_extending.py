"""The worked examples of extending the suite (docs/extending.md): a new estimator that needs a
capability no built-in one needs, with the task that provides it, and a new sampler, each added
by a plug-in file alone and accepted by its conformance suite through the command line."""

import textwrap

from bench.cli import main

# A ReFL-style estimator (one-step reward input): the chain runs to step k without a graph, then
# one denoiser call with its graph, and the reward is taken of that call's one-step prediction of
# x_0 instead of the sampler's x_0. The prediction is the task's to give (its model's output type
# decides the formula): the estimator needs the extra `x0-prediction`, and a task that can offer
# it attaches it to its problems.
ESTIMATOR_AND_TASK = textwrap.dedent('''
    import random

    import torch

    from bench.api import Cost, Estimate, Estimator, Option, at_least, backprop, register_estimator, register_task
    from tasks.toy import Toy

    X0_PREDICTION = "x0-prediction"  # extras: (x_i, i, out_i) -> the denoiser's one-step estimate of x_0


    @register_estimator
    class OneStepReward(Estimator):
        name = "test-one-step-reward"
        summary = "reward of the one-step x_0 prediction at step k, one call with its graph (ReFL-like)"
        options = (Option("k", int, 1, "the step whose prediction is rewarded", check=at_least(1)),)
        needs = {X0_PREDICTION: "the denoiser's one-step prediction of x_0 at a grid point"}

        def skip_reason(self, problem):
            if problem.target in ("latent", "noise"):
                return "the chain before step k runs without a graph: x_N and the noises get no gradient"
            return None

        def cost(self, steps, target):
            return Cost(nfe_forward=steps - self.k + 1, nfe_vjp=1, memory="A", activations=1)

        def check_steps(self, steps):
            if self.k > steps:
                from bench.api import SpecError
                raise SpecError(f"k={self.k} is beyond N={steps}")

        def estimate(self, problem, rng: random.Random) -> Estimate:
            chain, state = problem.chain, (problem.x_start,)
            with torch.no_grad():
                for i in range(problem.num_steps, self.k, -1):
                    state = chain.advance(state, i, problem.cond, None if problem.noises is None else problem.noises[i - 1])
            x = state[0].detach()
            out = chain.eps(x, self.k, problem.cond)
            return backprop(problem, problem.extras[X0_PREDICTION](x, self.k, out))


    @register_task
    class ToyWithPredictions(Toy):
        """The toy, offering its epsilon model's one-step prediction x_0 = (x_i - sigma_i eps) / alpha_i."""
        name = "test-toy-predicts"

        def offers(self):
            return {**super().offers(), X0_PREDICTION: True}

        def make_problem(self, target, steps, seed, dtype=None):
            problem = super().make_problem(target, steps, seed, dtype)
            schedule = problem.chain.schedule
            problem.extras[X0_PREDICTION] = lambda x, i, out: (x - schedule.sigma(i) * out) / schedule.alpha(i)
            return problem
''')

# A sampler as a plug-in file: diffusers' DPMSolverSinglestepScheduler at first order, whose step
# is DDIM's in lambda, built on the multistep solver's schedule class.
SAMPLER = textwrap.dedent("""
    from bench.samplers import SAMPLERS, Sampler
    from bench.samplers.dpm_solver import DPMSolverSchedule


    class SinglestepFirstOrder(Sampler):
        name = "test-singlestep1"
        summary = "DPM-Solver++ singlestep at order 1 (diffusers' DPMSolverSinglestepScheduler)"
        prediction = "epsilon"
        scheduler_class = "DPMSolverSinglestepScheduler"

        def scheduler_config(self):
            return {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": 1}

        def schedule_from(self, scheduler, steps, eta):
            return DPMSolverSchedule.read(scheduler, steps)


    SAMPLERS.register(SinglestepFirstOrder)
""")


def test_an_estimator_that_needs_a_new_capability_is_accepted_on_the_task_that_offers_it(tmp_path, capsys):
    plugin = tmp_path / "one_step_reward.py"
    plugin.write_text(ESTIMATOR_AND_TASK)
    on = ["--on", "test-toy-predicts[d=3,batch=6]", "--on", "test-toy-predicts[d=3,batch=6,eta=1.0]"]
    assert main(["check", "test-one-step-reward", "test-one-step-reward[k=2]", "--include", str(plugin), *on]) == 0
    out = capsys.readouterr().out
    assert "all checks pass" in out
    # on the plain toy nothing offers the prediction: every target is skipped, with the need named
    assert main(["check", "test-one-step-reward", "--include", str(plugin)]) == 1
    from bench.check.estimators import check_estimator

    skips = {c.name: c for c in check_estimator("test-one-step-reward")}["skip reasons"]
    assert skips.status == "fail" and "skips every target" in skips.detail, skips


def test_a_sampler_added_by_a_plug_in_file_passes_the_sampler_suite(tmp_path, capsys):
    plugin = tmp_path / "singlestep_sampler.py"
    plugin.write_text(SAMPLER)
    assert main(["check", "--samplers", "test-singlestep1", "--include", str(plugin)]) == 0
    assert "all checks pass" in capsys.readouterr().out
    # and a task samples with it by name
    assert (
        main(
            [
                "run",
                "--include",
                str(plugin),
                "--tasks",
                "toy[d=2,batch=2,sampler=test-singlestep1]",
                "--estimators",
                "full,sdo",
                "--targets",
                "latent",
                "--steps",
                "3",
                "--iters",
                "0",
                "--rounds",
                "1",
                "--no-memory",
                "--no-progress",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
