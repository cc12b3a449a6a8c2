"""The sdxl task on a tiny random SDXL pipeline built offline and loaded from its folder: the chain
is StableDiffusionXLPipeline's own sampler (two text encoders, the pooled embedding and size ids
through the added embedding, zeros for the empty negative prompt, guidance rescale), checkpoint
equals full on every target, the default estimators run, and bad input is one line."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from bench.cli import main
from bench.registry import TASKS
from tasks.sdxl.task import resolve_model

from conftest import cosine, gradient, rel_err, sweep_rows

MATCH = 1e-5  # float32; measured 9e-7 to 1.4e-6 at N = 4


@pytest.fixture(scope="module", autouse=True)
def cache(pipeline_cache):
    return pipeline_cache


@pytest.fixture(scope="module")
def sdxl(cache):
    task = TASKS.create("sdxl[batch=2]")
    task.setup(torch.device("cpu"))
    return task


@pytest.fixture(scope="module")
def pipe(cache):
    """The pipeline from the tiny folder, its Euler scheduler swapped for DDIM on the same configuration."""
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model("tiny"), local_files_only=True)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.config.force_zeros_for_empty_prompt
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "guided": ("", {}),
    "negative prompt": ("negative_prompt=a blurry photo", dict(negative_prompt=["a blurry photo"] * 2)),
    "guidance_rescale": ("guidance_rescale=0.7", dict(guidance_rescale=0.7)),
}


def _pipeline(pipe, task, x_start, output_type="latent", **call):
    return pipe(
        prompt=[task.prompt_list[b % len(task.prompt_list)] for b in range(x_start.shape[0])],
        num_inference_steps=4,
        guidance_scale=task.guidance,
        latents=x_start.clone(),
        output_type=output_type,
        height=32,
        width=32,
        **call,
    ).images


@pytest.mark.parametrize("case", list(CASES))
def test_the_chain_is_the_sdxl_pipelines_own_sampler(sdxl, pipe, case):
    options, call = CASES[case]
    task = TASKS.create(f"sdxl[batch=2{',' + options if options else ''}]")
    task.setup(torch.device("cpu"))
    for target in ("latent", "cond", "weights"):
        problem = task.make_problem(target, 4, 0)
        with torch.no_grad():
            ours = problem.chain.sample(problem.x_start, problem.cond)
        theirs = _pipeline(pipe, task, problem.x_start, **call)
        assert rel_err(ours.flatten(), theirs.flatten()) < MATCH, target
    if case != "guided":
        assert rel_err(_pipeline(pipe, sdxl, problem.x_start).flatten(), theirs.flatten()) > 1000 * MATCH


def test_the_decoded_images_are_the_pipelines(sdxl, pipe):
    problem = sdxl.make_problem("latent", 4, 0)
    with torch.no_grad():
        ours = sdxl.images(problem, problem.chain.sample(problem.x_start, problem.cond))
    theirs = _pipeline(pipe, sdxl, problem.x_start, output_type="pt")
    assert ours.shape == theirs.shape and rel_err(ours.flatten(), theirs.flatten()) < MATCH


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_checkpoint_agrees_with_full_through_the_vae(sdxl, target):
    grads = {spec: gradient(sdxl, spec, target, 3)[0] for spec in ("full", "checkpoint")}
    assert float(grads["full"].norm()) > 0 and cosine(grads["full"], grads["checkpoint"]) > 0.9999


@pytest.mark.slow
def test_the_default_estimators_run_on_every_target(tmp_path):
    rows = sweep_rows("sdxl[batch=1]", tmp_path / "run")
    assert all(r["grad_cos"] >= 0.9999 for r in rows if r["estimator"] == "checkpoint")


def test_an_sd_folder_is_refused_in_one_line(tmp_path, capsys):
    from tasks.sd.task import resolve_model as sd_model

    assert main(["run", "--tasks", f"sdxl[model={sd_model('tiny')}]", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "(no text_encoder_2/, tokenizer_2/)" in err and err.count("\n") == 1, err
