"""The flux task on a tiny random FLUX.1 pipeline built offline and loaded from its folder: the
chain is FluxPipeline's own sampler (packed latents, the dynamically shifted grid, the distilled
guidance scale as an input), its decoded images the pipeline's, checkpoint equals full on every
target, the default estimators run, and bad input is one line."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline

from bench.cli import main
from bench.registry import TASKS
from tasks.flux.task import dynamic_shift, resolve_model

from conftest import cosine, gradient, rel_err, sweep_rows

MATCH = 1e-5  # float32; measured 0 (the same float32 operations in the same order)
TASK = "flux[batch=2,max_sequence_length=32]"  # tiny: 32² images


@pytest.fixture(scope="module", autouse=True)
def cache(pipeline_cache):
    return pipeline_cache


@pytest.fixture(scope="module")
def flux(cache):
    task = TASKS.create(TASK)
    task.setup(torch.device("cpu"))
    return task


@pytest.fixture(scope="module")
def pipe(cache):
    pipe = FluxPipeline.from_pretrained(resolve_model("tiny"), local_files_only=True)
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.transformer.config.guidance_embeds
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline(pipe, task, x_start, guidance=3.5, output_type="latent"):
    return pipe(
        prompt=[task.prompt_list[b % len(task.prompt_list)] for b in range(x_start.shape[0])],
        num_inference_steps=4,
        guidance_scale=guidance,
        latents=x_start.clone(),
        output_type=output_type,
        height=32,
        width=32,
        max_sequence_length=32,
    ).images


@pytest.mark.parametrize("guidance", [None, 1.5])
def test_the_chain_is_the_flux_pipelines_own_sampler(pipe, guidance):
    task = TASKS.create(TASK.replace("]", f",guidance={guidance}]") if guidance else TASK)
    task.setup(torch.device("cpu"))
    for target in ("latent", "cond", "weights"):
        problem = task.make_problem(target, 4, 0)
        with torch.no_grad():
            ours = problem.chain.sample(problem.x_start, problem.cond)
        theirs = _pipeline(pipe, task, problem.x_start, guidance or 3.5)
        assert ours.shape == (2, 64, 16) and rel_err(ours.flatten(), theirs.flatten()) < MATCH, target
    assert rel_err(ours.flatten(), problem.x_start.flatten()) > 0.01
    other = _pipeline(pipe, task, problem.x_start, 7.0 if guidance else 1.5)
    assert rel_err(other.flatten(), theirs.flatten()) > 1000 * MATCH  # the guidance input matters


def test_the_grid_is_shifted_by_the_images_token_count(flux):
    """mu grows linearly from base_shift at 256 tokens to max_shift at 4096 (FluxPipeline's)."""
    config = flux.scheduler_config()
    assert dynamic_shift(256, config) == pytest.approx(0.5) and dynamic_shift(4096, config) == pytest.approx(1.15)
    schedule = flux.make_schedule(4)
    sigmas = schedule.sigmas[1:][::-1]  # sampling order, the final 0 left out
    mu = dynamic_shift(64, config)
    plain = torch.linspace(1, 0.25, 4, dtype=torch.float64)
    shifted = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / plain - 1))
    assert torch.allclose(torch.tensor(sigmas, dtype=torch.float64), shifted, rtol=1e-6)


def test_the_decoded_images_are_the_pipelines(flux, pipe):
    problem = flux.make_problem("latent", 4, 0)
    with torch.no_grad():
        ours = flux.images(problem, problem.chain.sample(problem.x_start, problem.cond))
    theirs = _pipeline(pipe, flux, problem.x_start, output_type="pt")
    assert ours.shape == theirs.shape == (2, 3, 32, 32) and rel_err(ours.flatten(), theirs.flatten()) < MATCH


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_checkpoint_agrees_with_full(flux, target):
    grads = {spec: gradient(flux, spec, target, 3)[0] for spec in ("full", "checkpoint")}
    assert float(grads["full"].norm()) > 0 and cosine(grads["full"], grads["checkpoint"]) > 0.9999


@pytest.mark.slow
def test_the_default_estimators_run_on_every_target(tmp_path):
    rows = sweep_rows(TASK, tmp_path / "run")
    assert all(r["grad_cos"] >= 0.9999 for r in rows if r["estimator"] == "checkpoint")


def test_guidance_on_a_model_without_its_embedding_is_refused(tmp_path, capsys):
    schnell = tmp_path / "schnell"
    shutil.copytree(resolve_model("tiny"), schnell)
    config = json.loads((schnell / "transformer" / "config.json").read_text())
    (schnell / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    assert main(["run", "--tasks", f"flux[model={schnell},guidance=3.5]", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "has no guidance embedding" in err and err.count("\n") == 1, err
    assert main(["run", "--tasks", "flux[resolution=34]", "--out", str(tmp_path / "run")]) == 2
    assert "must be a positive multiple of 4" in capsys.readouterr().err
