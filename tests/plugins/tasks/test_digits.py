"""The digits task: the pipeline end to end on every target (random-weight models, saved and
loaded exactly as trained ones), and the shipped model's claims (recognisable samples,
checkpoint == full in float32, rewards that rise under optimisation)."""

import random

import pytest
import torch

from bench.cli import main
from bench.errors import SpecError
from bench.registry import ESTIMATORS, TASKS
from conftest import cosine, gradient
from digits_fixtures import write_random_models
from tasks.digits import metrics, paths

TARGETS = ["latent", "cond", "weights"]


@pytest.fixture(scope="module")
def random_digits(tmp_path_factory):
    folder = write_random_models(tmp_path_factory.mktemp("models"))
    task = TASKS.create(f"digits[models={folder},batch=2,fid_samples=8]")
    task.setup(torch.device("cpu"))
    return task


@pytest.fixture(scope="module")
def shipped():
    if paths.locate() != paths.COMMITTED:
        pytest.fail("the trained digits models are not in tasks/digits/weights/")
    task = TASKS.create("digits[batch=4]")
    task.setup(torch.device("cpu"))
    return task


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spec", ["full", "checkpoint", "adjoint", "sdo", "truncated[k=2,latent_path=true]"])
def test_every_estimator_runs_on_every_target(random_digits, target, spec):
    problem = random_digits.make_problem(target, 3, 0)
    outcome = ESTIMATORS.create(spec)(problem, random.Random(0))
    grad = problem.flat_grad()
    assert torch.isfinite(grad).all() and float(grad.norm()) > 0
    assert outcome.x0.shape == (2, 1, 8, 8) and outcome.rewards.shape == (2,)
    metrics_ = random_digits.evaluate(problem, outcome.x0)
    assert {"reward", "fid", "accuracy", "diversity"} <= set(metrics_)


@pytest.mark.parametrize("tune", ["lora", "full"])
def test_weights_target_trains_lora_adapters_or_all_weights(random_digits, tune):
    task = TASKS.create(f"{random_digits.spec[:-1]},tune={tune}]")
    task.setup(torch.device("cpu"))
    problem = task.make_problem("weights", 2, 0)
    names = [name for name, p in problem.chain.denoiser.named_parameters() if p.requires_grad]
    if tune == "lora":
        assert names and all("lora" in name for name in names)
    else:
        assert len(names) == len(list(task.unet.parameters()))
    reference = task.make_problem("weights", 2, 0, dtype=torch.float64)  # same adapters, float64
    ESTIMATORS.create("full")(problem, random.Random(0))
    ESTIMATORS.create("full")(reference, random.Random(0))
    assert cosine(problem.flat_grad().double(), reference.flat_grad()) > 0.9999


def test_clean_fid_skips_cleanly_without_inception_weights(tmp_path):
    value, reason = metrics.clean_fid(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), weights=tmp_path / "absent.pt")
    assert value is None and "not found" in reason


def test_digits_fid_separates_real_from_noise(shipped):
    reals = shipped.held_out_images
    half = len(reals) // 2
    same = metrics.digits_fid(shipped.classifier, reals[:half], reals[half:])
    noise = metrics.digits_fid(shipped.classifier, torch.rand(half, 1, 8, 8) * 2 - 1, reals[half:])
    assert same < 0.1 * noise


def recognised(task, steps: int = 20) -> float:
    """The fraction of 8 samples per class (N steps) the classifier names as their class."""
    from tasks.digits.grid import sample_classes

    samples, labels = sample_classes(task, per_class=8, steps=steps)
    with torch.no_grad():
        return float((task.classifier(samples).argmax(-1) == labels).float().mean())


def test_the_shipped_model_draws_recognisable_digits(shipped):
    assert recognised(shipped) >= 0.8


@pytest.mark.parametrize("target", TARGETS)
def test_checkpoint_agrees_with_full_in_float32(shipped, target):
    grads = [gradient(shipped, spec, target, 8)[0] for spec in ("full", "checkpoint")]
    assert cosine(grads[0], grads[1]) > 0.9999


@pytest.mark.parametrize("target", TARGETS)
def test_optimising_with_full_raises_the_classify_reward(shipped, target):
    problem = shipped.make_problem(target, 6, 0)
    optimiser = torch.optim.Adam(problem.leaves, lr=shipped.learning_rates[target])
    estimator, rng, curve = ESTIMATORS.create("full"), random.Random(0), []
    for _ in range(24):
        curve.append(float(estimator(problem, rng).rewards.mean()))
        optimiser.step()
    final = float(problem.loss(problem.chain.sample(problem.x_start, problem.cond))[1].mean())
    assert final > curve[0] + 0.5, (curve[0], final)  # log p(digit=7 | x) rises clearly


def test_run_on_digits_records_fid_and_reward(random_digits, tmp_path):
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--tasks",
                random_digits.spec,
                "--estimators",
                "full,sdo,truncated",
                "--steps",
                "3",
                "--iters",
                "2",
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
    from bench.results.store import load_frame

    frame = load_frame(out)
    ok = frame[frame.status == "ok"]
    assert len(ok) == 8 and (frame.status == "skipped").sum() == 1  # truncated on the latent
    assert ok.eval_fid.notna().all() and ok.reward_final.notna().all()
    # Every quality figure has its baseline (the unoptimised sampler at the same point) and the floor.
    for metric in ("fid", "kid", "accuracy", "reward"):
        assert ok[f"eval_{metric}_init"].notna().all(), metric
    assert ok.eval_fid_floor.notna().all() and ok.eval_kid_floor.notna().all()
    assert ok.eval_reference.str.startswith("held-out digits of class 7").all()
    same_point = ok[(ok.target == "weights")]
    assert same_point.eval_fid_init.nunique() == 1  # one baseline per point, whatever the estimator


def test_kid_is_torchmetrics_kid_over_one_subset_of_every_sample(shipped):
    """With as many reals as fakes and one subset of that size, torchmetrics' KID is the unbiased
    MMD² over all samples (its subset draw is only a permutation): an independent check."""
    from torchmetrics.image.kid import KernelInceptionDistance

    from tasks.digits.classifier import FeatureExtractor

    generator = torch.Generator().manual_seed(0)
    for fakes in (torch.rand(12, 1, 8, 8, generator=generator) * 2 - 1, shipped.held_out_images[20:32]):
        reals = shipped.held_out_images[:12]
        theirs = KernelInceptionDistance(
            feature=FeatureExtractor(shipped.classifier).float(), subsets=1, subset_size=12
        )
        theirs.update(reals, real=True)  # FeatureExtractor reads [-1, 1] images as given
        theirs.update(fakes, real=False)
        with torch.random.fork_rng():
            mean, _ = theirs.compute()
        assert metrics.digits_kid(shipped.classifier, fakes, reals) == pytest.approx(float(mean), rel=1e-4, abs=1e-6)


def test_class_matched_quality_moves_the_right_way_when_the_reward_succeeds(shipped):
    """The classify reward asks for 7; a sampler that draws 7s (its success: reward and accuracy
    up) must score a better class-matched FID and KID than one that draws 1s, and the
    real-versus-real floor is below both."""
    from bench.registry import TASKS

    scores = {}
    for cls in (1, 7):
        task = TASKS.create(f"digits[cls={cls},digit=7,fid_samples=48]")
        task.setup(torch.device("cpu"))
        problem = task.make_problem("cond", 10, 0)
        scores[cls] = task.evaluate(problem, problem.chain.sample(problem.x_start, problem.cond))
    assert task.quality_reference().startswith("held-out digits of class 7")
    assert scores[7]["reward"] > scores[1]["reward"] and scores[7]["accuracy"] > scores[1]["accuracy"]
    assert scores[7]["fid"] < scores[1]["fid"] and scores[7]["kid"] < scores[1]["kid"]
    floor = task.quality_floor()
    assert floor["fid"] < scores[7]["fid"] and abs(floor["kid"]) < scores[1]["kid"]


def test_the_audit_reward_is_a_second_judge_that_the_optimisation_never_sees(shipped, random_digits):
    """The shipped audit classifier (a pixel MLP, another seed) recognises held-out digits but is
    another function than the reward's classifier; held_out=audit is evaluated beside the optimised
    reward with its own baseline, its weights are in the cell's key only where it is named, and
    naming the optimised reward or a folder without the audit weights is refused."""
    from tasks.digits.classifier import accuracy

    task = TASKS.create("digits[batch=4,held_out=audit]")
    task.setup(torch.device("cpu"))
    audit = task.audit_in(torch.float32)
    images, labels = task.held_out_images, task.held_out_labels
    assert accuracy(audit, images, labels) > 0.97
    logp = torch.log_softmax(audit(images), -1)
    assert (logp - torch.log_softmax(task.classifier(images), -1)).abs().mean() > 0.01
    problem = task.make_problem("latent", 4, 0)
    x0 = problem.chain.sample(problem.x_start, problem.cond)
    found = task.evaluate(problem, x0)
    expected = torch.log_softmax(audit(x0), -1)[:, task.digit].mean()
    assert found["held_out"] == pytest.approx(float(expected), rel=1e-6)
    assert found["reward"] == pytest.approx(float(shipped.reward_of(x0).mean()), rel=1e-6)
    assert "held_out_fresh" not in found  # the latent target draws no fresh samples
    assert task.data_fingerprint().startswith(shipped.data_fingerprint() + "+")
    judged = TASKS.create("digits[batch=2,reward=audit]")
    judged.setup(torch.device("cpu"))
    x = x0[:2].clone().requires_grad_(True)
    judged.reward_of(x).sum().backward()
    assert float(x.grad.norm()) > 0
    with pytest.raises(SpecError, match="held-out reward is the optimised one"):
        TASKS.create("digits[held_out=classify]").preflight()
    with pytest.raises(SpecError, match="--what audit"):
        TASKS.create(f"{random_digits.spec[:-1]},held_out=audit]").preflight()


@pytest.fixture(scope="module", params=["flow", "transformer"])
def shipped_flow(request):
    """The two rectified-flow models: the U-Net and the transformer (an SD3 MMDiT)."""
    model = request.param
    if paths.locate(model) != paths.COMMITTED:
        pytest.fail(f"the {model} digits model is not in tasks/digits/weights/{model}/")
    task = TASKS.create(f"digits[model={model},batch=4]")
    task.setup(torch.device("cpu"))
    return task


def test_the_flow_models_draw_recognisable_digits_with_flow_matching_euler(shipped_flow):
    assert shipped_flow.chosen_sampler().name == "flow-euler"
    assert recognised(shipped_flow) >= 0.9


def test_the_transformer_reads_the_class_through_joint_attention_and_the_pooled_projection():
    """The task's denoiser is diffusers' SD3Transformer2DModel called with the class tokens as
    encoder_hidden_states and their mean as pooled_projections; LoRA adapts both streams."""
    task = TASKS.create("digits[model=transformer,batch=2]")
    task.setup(torch.device("cpu"))
    problem = task.make_problem("latent", 2, 0)
    network = task.unet.transformer
    x, t = problem.x_start.detach(), torch.full((2,), 500.0)
    cond = problem.cond.expand(2, *problem.cond.shape)
    theirs = network(hidden_states=x, timestep=t, encoder_hidden_states=cond, pooled_projections=cond.mean(1)).sample
    assert torch.equal(task.unet(x, t, encoder_hidden_states=cond).sample, theirs)
    adapted = [
        name for name, p in task.make_problem("weights", 2, 0).chain.denoiser.named_parameters() if p.requires_grad
    ]
    assert any("add_q_proj.lora" in name for name in adapted) and any(".to_q.lora" in name for name in adapted)
    assert (
        len(task.block_flops()) == 7
    )  # gates on its six joint blocks, and the rest (tests/plugins/tasks/test_gates.py)


@pytest.mark.parametrize("target", TARGETS)
def test_the_default_estimators_run_on_the_flow_models(shipped_flow, target):
    from bench.options import split_list
    from bench.run.runner import DEFAULT_ESTIMATORS

    exact = None
    for spec in split_list(DEFAULT_ESTIMATORS):
        estimator = ESTIMATORS.create(spec)
        problem = shipped_flow.make_problem(target, 4, 0)
        if estimator.skip_reason(problem):
            assert spec.startswith("truncated") and target == "latent"
            continue
        estimator(problem, random.Random(0))
        grad = problem.flat_grad()
        assert torch.isfinite(grad).all() and float(grad.norm()) > 0, spec
        if spec == "full":
            exact = grad
        elif spec == "checkpoint":
            assert cosine(grad, exact) > 0.9999
