"""ShortFT's shortcut-model: the student's chain, its gradient, the shipped student, bad input."""

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from bench.results import store
from bench.cli import main
from bench.registry import ESTIMATORS, TASKS
from digits_fixtures import write_random_models
from tasks.digits import paths, shortcut


def _write_student(folder, steps, scale, seed=1):
    """A student delta for the random U-Net in `folder` (scale 0: the teacher itself)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    generator = torch.Generator().manual_seed(seed)
    delta = {
        name: (scale * torch.randn(p.shape, generator=generator)).contiguous() for name, p in unet.named_parameters()
    }
    path = shortcut.weights_path(folder, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(delta, path)
    path.with_suffix(".json").write_text(json.dumps({"steps": steps}))
    return delta


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """Two model folders with random weights: one whose 2-step student is the teacher (delta 0),
    one whose student differs by a random delta."""
    out = {}
    for name, scale in (("zero", 0.0), ("random", 0.02)):
        folder = write_random_models(tmp_path_factory.mktemp(name))
        _write_student(folder, 2, scale)
        out[name] = folder
    return out


def _grad(task, spec, target, steps):
    problem = task.make_problem(target, steps, 0, dtype=torch.float64)
    ESTIMATORS.create(spec)(problem, random.Random(0))
    return problem.flat_grad(), problem


def _task(folder, extra=""):
    task = TASKS.create(f"digits[models={folder},batch=2{extra}]")
    task.setup(torch.device("cpu"))
    return task


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_a_student_equal_to_its_teacher_gives_the_k_step_chains_exact_gradient(students, target):
    task = _task(students["zero"])
    short, problem = _grad(task, "shortcut-model[steps=2]", target, 6)  # the long chain's N does not enter
    exact, _ = _grad(task, "full", target, 2)
    assert torch.allclose(short, exact, rtol=1e-10, atol=1e-14)
    assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (2, 2)


@pytest.mark.parametrize("tune", ["lora", "full"])
@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_the_students_gradient_equals_backprop_through_a_unet_holding_the_delta(students, target, tune):
    """Independent construction: the delta added in place to the weights of a second problem's
    U-Net, then full backprop through its 2-step DDIM chain; the estimator adds it functionally."""
    task = _task(students["random"], f",tune={tune}")
    short, _ = _grad(task, "shortcut-model[steps=2]", target, 5)
    delta, _ = shortcut.load_delta(students["random"], 2)
    problem = task.make_problem(target, 2, 0, dtype=torch.float64)
    with torch.no_grad():
        for name, param in problem.chain.denoiser.unet.named_parameters():
            plain = name.replace(".base_layer", "")
            if plain in delta:
                param.add_(delta[plain].double())
    ESTIMATORS.create("full")(problem, random.Random(0))
    reference = problem.flat_grad()
    teacher, _ = _grad(task, "full", target, 2)
    assert torch.allclose(short, reference, rtol=1e-9, atol=1e-13)
    assert not torch.allclose(short, teacher, rtol=1e-3)  # the delta matters: the test can fail


def test_the_shipped_student_follows_the_teacher_and_draws_recognisable_digits():
    folder = paths.locate()
    assert folder == paths.COMMITTED and 4 in shortcut.shipped_steps(folder)
    record = json.loads((folder / "training.json").read_text())["shortcut-k4"]["check"]
    assert record["student_recognised"] >= 0.9  # 1000 samples, written by python -m tasks.digits.shortcut
    task = TASKS.create("digits")
    task.setup(torch.device("cpu"))
    delta, _ = shortcut.load_delta(folder, 4)
    fresh = shortcut.check(task, delta, 4, per_class=10, seed=7)  # noise the record did not see
    assert fresh["student_recognised"] >= 0.8
    assert fresh["student_mae"] < fresh["teacher_k_steps_mae"]  # closer to the long chain than 4 plain steps


def test_optimising_with_the_student_records_the_long_chains_rewards(students, tmp_path):
    folder = students["random"]
    task = f"digits[models={folder},batch=2,fid_samples=8]"
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--tasks",
                task,
                "--estimators",
                "shortcut-model[steps=2]",
                "--targets",
                "weights",
                "--steps",
                "3",
                "--iters",
                "32",
                "--rounds",
                "1",
                "--warmup",
                "0",
                "--no-memory",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (short,) = store.read_rows(out)
    assert short["status"] == "ok" and short["nfe_forward"] == 2
    # the 3-step chain evaluated apart at the powers of 2, every 32 // 16 = 2nd iterate and the end
    assert short["reward_curve_iter"] == [0, 1, *range(2, 33, 2)] and short["iters_done"] == 32
    assert len(short["reward_curve"]) == len(short["reward_curve_s"]) == 18
    start = _task(folder, ",fid_samples=8").make_problem("weights", 3, 0)
    long_reward = float(start.reward_fn(start.chain.sample(start.x_start, start.cond)).mean())
    assert short["reward_init"] == pytest.approx(long_reward, rel=1e-6)  # the 3-step chain's, not the student's


def test_a_budget_stops_the_optimisation(tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--tasks",
                "toy[d=4]",
                "--estimators",
                "full",
                "--targets",
                "latent",
                "--steps",
                "3",
                "--iters",
                "50",
                "--budget",
                "1e-9",
                "--rounds",
                "1",
                "--no-memory",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (row,) = store.read_rows(out)
    assert row["iters_done"] == 1 and row["budget"] == 1e-9 and len(row["reward_curve"]) == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--tasks", "toy", "--estimators", "shortcut-model[steps=100]"],
            "shortcut-model[steps=100] on toy: it ships steps=1..64",
        ),
        (
            ["--tasks", "digits", "--estimators", "shortcut-model[steps=3]"],
            "shortcut-model[steps=3] on digits: it ships steps=4",
        ),
        (
            ["--tasks", "digits[model=flow,sampler=flow-euler]", "--estimators", "shortcut-model"],
            "it has no distilled student; tasks with students: digits (steps=4), toy",
        ),
    ],
)
def test_a_task_without_that_student_is_one_line(capsys, tmp_path, argv, message):
    assert main(["run", *argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_on_the_toy_the_stand_in_student_gives_the_k_step_chains_gradient():
    task = TASKS.create("toy[d=3]")
    task.setup(torch.device("cpu"))
    for target in ("latent", "cond", "weights"):
        short, _ = _grad(task, "shortcut-model[steps=3]", target, 8)
        exact, _ = _grad(task, "full", target, 3)
        assert torch.allclose(short, exact, rtol=1e-12, atol=1e-15), target


def test_a_sampler_the_student_does_not_follow_is_skipped(students):
    task = _task(students["zero"], ",sampler=dpmpp2m")
    problem = task.make_problem("latent", 4, 0)
    assert "follows its deterministic chain" in ESTIMATORS.create("shortcut-model[steps=2]").skip_reason(problem)
