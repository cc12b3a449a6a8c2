"""The sd task on a tiny random pipeline built offline: diffusers' own sampler, gradients through
the VAE decoder, rewards against finite differences, loading by path, and refused input."""

import math
import random
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from bench.cli import main
from bench.registry import ESTIMATORS, TASKS
from bench.run.runner import SweepSpec, run_sweep
from tasks.sd import rewards, tiny
from tasks.sd.task import resolve_model

from conftest import cosine, gradient, rel_err


@pytest.fixture(scope="module", autouse=True)
def cache(pipeline_cache):
    return pipeline_cache


@pytest.fixture(scope="module")
def sd(cache):
    task = TASKS.create("sd[batch=2]")
    task.setup(torch.device("cpu"))
    return task


@pytest.fixture(scope="module")
def pipe(cache):
    """StableDiffusionPipeline loaded from the tiny pipeline's folder (the path a user's weights
    take), with DDIM on the folder's own scheduler configuration."""
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_model("tiny"), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_chain_is_the_pipelines_own_sampler(sd, pipe):
    """Same prompts, latents, guidance and DDIM grid (SD 1.x's leading spacing, steps_offset = 1):
    the task's chain and StableDiffusionPipeline give the same final latents."""
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.timestep_spacing == "leading"
    problem = sd.make_problem("latent", 6, 0)
    ours = problem.chain.sample(problem.x_start, problem.cond)
    theirs = pipe(
        prompt=sd.prompt_list[:2],
        num_inference_steps=6,
        guidance_scale=sd.guidance,
        eta=0.0,
        latents=problem.x_start.clone(),
        output_type="latent",
    ).images
    assert rel_err(ours.flatten(), theirs.flatten()) < 1e-5


# (the task's options, the same request to StableDiffusionPipeline)
GUIDANCE_CASES = {
    "empty prompt": ("prompt=", dict(prompt="")),
    "negative prompt": ("negative_prompt=a blurry photo", dict(negative_prompt="a blurry photo")),
    "guidance_rescale": ("guidance_rescale=0.7", dict(guidance_rescale=0.7)),
    "all three": (
        "prompt=,negative_prompt=a blurry photo,guidance_rescale=0.7",
        dict(prompt="", negative_prompt="a blurry photo", guidance_rescale=0.7),
    ),
}
MATCH = 1e-5  # float32, 3 guided U-Net calls: measured 1e-7 to 9e-7; a batch-wide std in the rescale gives 7e-3


def _pipeline_latents(pipe, task, x_start, output_type="latent", prompt=None, negative_prompt=None, **call):
    batch = x_start.shape[0]
    prompts = (
        [prompt] * batch if prompt is not None else [task.prompt_list[b % len(task.prompt_list)] for b in range(batch)]
    )
    negative = [negative_prompt] * batch if negative_prompt is not None else None  # a list, as the prompts
    return pipe(
        prompt=prompts,
        negative_prompt=negative,
        num_inference_steps=3,
        guidance_scale=task.guidance,
        eta=0.0,
        latents=x_start.clone(),
        output_type=output_type,
        **call,
    ).images


@pytest.mark.parametrize("case", list(GUIDANCE_CASES))
def test_empty_and_negative_prompts_and_guidance_rescale_are_the_pipelines(sd, pipe, case):
    """The chain of every target (the estimators' denoiser: negative prompt in the unguided half,
    the rescale inside the guided prediction) gives the pipeline's latents for the same request,
    and the request changes the pipeline's latents by far more than the tolerance."""
    options, call = GUIDANCE_CASES[case]
    task = TASKS.create(f"sd[batch=2,{options}]")
    task.setup(torch.device("cpu"))
    for target in ("latent", "cond", "weights"):
        problem = task.make_problem(target, 3, 0)
        with torch.no_grad():
            ours = problem.chain.sample(problem.x_start, problem.cond)
        theirs = _pipeline_latents(pipe, task, problem.x_start, **call)
        assert rel_err(ours.flatten(), theirs.flatten()) < MATCH, target
    plain = sd.make_problem("latent", 3, 0)
    assert torch.equal(plain.x_start, problem.x_start)
    without = _pipeline_latents(pipe, sd, plain.x_start)
    assert rel_err(without.flatten(), theirs.flatten()) > 1000 * MATCH


def test_the_decoded_images_of_all_three_are_the_pipelines(pipe):
    options, call = GUIDANCE_CASES["all three"]
    task = TASKS.create(f"sd[batch=2,{options}]")
    task.setup(torch.device("cpu"))
    problem = task.make_problem("latent", 3, 0)
    with torch.no_grad():
        ours = task.images(problem, problem.chain.sample(problem.x_start, problem.cond))
    theirs = _pipeline_latents(pipe, task, problem.x_start, output_type="pt", **call)
    assert ours.shape == theirs.shape and rel_err(ours.flatten(), theirs.flatten()) < MATCH


def test_the_rescale_is_lin_et_als_equation_16():
    """guidance_rescale against diffusers' rescale_noise_cfg on random predictions (float64)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from tasks.sd.task import rescale_guided

    generator = torch.Generator().manual_seed(0)
    guided, cond = (torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64) * scale for scale in (3, 1))
    for phi in (0.0, 0.3, 0.7, 1.0):
        assert torch.allclose(
            rescale_guided(guided, cond, phi), rescale_noise_cfg(guided, cond, phi), rtol=1e-14, atol=0
        )
    matched = rescale_guided(guided, cond, 1.0)  # phi = 1: each sample has the conditional one's std
    assert torch.allclose(matched.flatten(1).std(1), cond.flatten(1).std(1), rtol=1e-12)


def test_gradients_flow_through_the_negative_prompt_and_the_rescale(cache):
    task = TASKS.create("sd[batch=2,negative_prompt=a blurry photo,guidance_rescale=0.7]")
    task.setup(torch.device("cpu"))
    grads = {spec: gradient(task, spec, "cond", 2)[0] for spec in ("full", "checkpoint")}
    assert float(grads["full"].norm()) > 0 and cosine(grads["full"], grads["checkpoint"]) > 0.9999


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_checkpoint_agrees_with_full_through_the_vae(sd, target):
    grads = {spec: gradient(sd, spec, target, 3)[0] for spec in ("full", "checkpoint")}
    assert float(grads["full"].norm()) > 0
    assert cosine(grads["full"], grads["checkpoint"]) > 0.9999


def test_a_saved_folder_loaded_by_path_gives_the_built_in_gradients(sd, tmp_path):
    copy = tmp_path / "my-sd"
    shutil.copytree(resolve_model("tiny"), copy)
    by_path = TASKS.create(f"sd[batch=2,model={copy}]")
    by_path.setup(torch.device("cpu"))
    grads = []
    for task in (sd, by_path):
        problem = task.make_problem("cond", 3, 0)
        ESTIMATORS.create("full")(problem, random.Random(0))
        grads.append(problem.flat_grad().clone())
    assert torch.equal(grads[0], grads[1])


def test_clip_and_aesthetic_rewards_match_central_finite_differences(cache):
    folder = tiny.build_clip(cache / "clip-fd")
    clip = rewards.ClipImageEmbedding(folder, torch.device("cpu"), torch.float64)
    _check_fd(rewards.ClipSimilarity(clip, folder, "a red square"))
    head = rewards.write_tiny_aesthetic_head(cache / "head.pth", clip.model.config.projection_dim)
    _check_fd(rewards.AestheticScore(clip, head))


def test_pickscore_is_clips_own_logits_against_each_samples_prompt(cache):
    """exp(logit_scale) * cos(image, its prompt): the diagonal of CLIPModel's own logits_per_image
    on the same pixels, the learned scale included (set away from its initial value here); and its
    gradient matches central finite differences."""
    from transformers import CLIPTokenizer

    folder = tiny.build_clip(cache / "clip-pick")
    clip = rewards.ClipImageEmbedding(folder, torch.device("cpu"), torch.float64)
    clip.model.logit_scale.data.fill_(3.7)
    prompts = ["a red square", "a blue circle", "a green field"]
    score = rewards.PickScore(clip, folder, prompts)
    images = torch.rand(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tokens = CLIPTokenizer.from_pretrained(folder)(
        [prompts[b % 3] for b in range(4)], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    pixels = (torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic") - clip.mean) / clip.std
    with torch.no_grad():
        logits = clip.model(input_ids=tokens.input_ids, pixel_values=pixels).logits_per_image
    assert torch.allclose(score(images), logits.diagonal(), rtol=1e-10, atol=0)
    assert abs(score.scale - math.exp(3.7)) < 1e-9
    _check_fd(score)


def test_lpips_reward_matches_finite_differences_and_runs_in_a_sweep(cache, tmp_path):
    from PIL import Image

    backbone = rewards.write_random_alexnet(tmp_path / "alexnet.pth")
    target = tmp_path / "target.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(target)
    _check_fd(rewards.LpipsDistance(backbone, target, torch.device("cpu"), torch.float64), size=32)
    spec = SweepSpec(
        tasks=[f"sd[batch=1,reward=lpips,lpips_backbone={backbone},reference_image={target}]"],
        estimators=["full", "sdo"],
        targets=["latent"],
        steps=[2],
        iters=1,
        rounds=1,
        memory="off",
    )
    rows = run_sweep(spec, tmp_path / "run")
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["grad_cos"] > 0.999999
    assert (tmp_path / "run" / rows[0]["samples_png"]).is_file()


def _check_fd(reward, size=8):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, size, size, generator=generator, dtype=torch.float64).requires_grad_(True)
    reward(images).sum().backward()
    direction = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (reward(images + h * direction) - reward(images - h * direction)).sum() / (2 * h)
    assert float((images.grad * direction).sum()) == pytest.approx(float(fd), rel=1e-6)


def test_jpeg_is_a_skip_for_backprop_and_a_signal_for_the_score_function(tmp_path):
    spec = SweepSpec(
        tasks=["sd[batch=2,eta=1.0,reward=jpeg]"],
        estimators=["full", "score-function"],
        targets=["cond"],
        steps=[2],
        iters=1,
        rounds=1,
        memory="off",
    )
    rows = {row["estimator"]: row for row in run_sweep(spec, tmp_path)}
    assert rows["full"]["status"] == "skipped" and "not differentiable" in rows["full"]["reason"]
    assert rows["score-function"]["status"] == "ok" and rows["score-function"]["grad_norm"] > 0


def test_a_user_reward_plugs_in_by_file(tmp_path):
    plugin = tmp_path / "my_reward.py"
    plugin.write_text("def brightness(images):\n    return images.mean(dim=(1, 2, 3))\n")
    task = TASKS.create(f"sd[batch=1,reward={plugin}:brightness]")
    task.setup(torch.device("cpu"))
    problem = task.make_problem("latent", 2, 0)
    outcome = ESTIMATORS.create("full")(problem, random.Random(0))
    assert 0 < float(outcome.rewards.mean()) < 1 and float(problem.flat_grad().norm()) > 0


@pytest.mark.parametrize(
    "option,message",
    [
        ("model=/nonexistent/sd", "no such folder"),
        ("model={empty}", "is not a diffusers pipeline folder (no unet/"),
        ("clip_model=/nonexistent/clip", "sd[clip_model=/nonexistent/clip]: no such folder"),
        ("dtype=fp8", "is not one of fp32, bf16, fp16"),
        ("prompts={empty_file}", "the file holds no prompt"),
        ("reward=aesthetics", "must be one of clip, aesthetic, lpips, jpeg"),
        (
            "reward=aesthetic,aesthetic_head=/nonexistent/head.pth",
            "the aesthetic head file '/nonexistent/head.pth' is missing",
        ),
        ("reward=/nonexistent/r.py:f", "no such file"),
        ("reward=lpips", "lpips_backbone='' is not a file"),
        ("guidance=0.5", "must be >= 1"),
    ],
)
def test_bad_sd_input_is_one_line(tmp_path, capsys, option, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "prompts.txt").write_text("\n  \n")
    option = option.replace("{empty}", str(tmp_path / "empty")).replace("{empty_file}", str(tmp_path / "prompts.txt"))
    code = main(["run", "--tasks", f"sd[{option}]", "--steps", "2", "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@CUDA
def test_on_cuda_each_cell_runs_in_its_own_process_with_cuda_counters(tmp_path):
    spec = SweepSpec(
        tasks=["sd[batch=2]"],
        estimators=["full", "checkpoint"],
        targets=["weights"],
        steps=[4, 8],
        iters=1,
        rounds=2,
        device="cuda",
    )
    rows = {(r["estimator"], r["steps"]): r for r in run_sweep(spec, tmp_path)}
    for row in rows.values():
        assert row["status"] == "ok" and row["mem_kind"] == "cuda_max_allocated"
        assert row["mem_reserved_peak_bytes"] >= row["peak_mem_bytes"] > 0
    assert rows[("full", 8)]["peak_mem_bytes"] > 1.5 * rows[("full", 4)]["peak_mem_bytes"]
    assert rows[("checkpoint", 8)]["peak_mem_bytes"] < 0.5 * rows[("full", 8)]["peak_mem_bytes"]


def test_sample_grids_land_in_the_run_folder_and_the_report(tmp_path):
    spec = SweepSpec(
        tasks=["sd[batch=2]"], estimators=["sdo"], targets=["latent"], steps=[2], iters=1, rounds=1, memory="off"
    )
    row = run_sweep(spec, tmp_path / "run")[0]
    from PIL import Image

    grid = Image.open(tmp_path / "run" / row["samples_png"])
    assert grid.size[1] > grid.size[0] / 2  # two rows (before, after) of two samples
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.md").read_text()
    assert "before (top) and after (bottom)" in page and list((tmp_path / "report").glob("samples-*.png"))


def test_an_edited_prompts_file_changes_the_cells_data_key(tmp_path):
    prompts, negative = tmp_path / "prompts.txt", tmp_path / "negative.txt"
    prompts.write_text("a red fox\n")
    negative.write_text("blurry, low quality\n")
    spec = f"sd[prompts={prompts},negative_prompt_file={negative}]"
    keys = [TASKS.create(spec).data_fingerprint()]
    prompts.write_text("a grey wolf\n")
    keys.append(TASKS.create(spec).data_fingerprint())
    negative.write_text("blurry, low quality, watermark\n")
    keys.append(TASKS.create(spec).data_fingerprint())
    assert len(set(keys)) == 3
    task = TASKS.create(spec)
    task.preflight()
    assert task.prompt_list == ["a grey wolf"] and task.negative_text == "blurry, low quality, watermark"
