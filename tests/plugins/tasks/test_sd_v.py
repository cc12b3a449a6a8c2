"""The sd task on a v-prediction pipeline (SD 2.x-class: `model=tiny-v`, built offline and loaded
from its folder): the chain is StableDiffusionPipeline's own sampler on DDIM and DPM-Solver++ with
the same scheduler configuration, guidance rescale included, and the estimators run on it."""

import random

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from bench.registry import ESTIMATORS, TASKS
from tasks.sd.task import resolve_model

from conftest import cosine, rel_err, sweep_rows

MATCH = 1e-5  # float32 (the epsilon pipeline's measured agreement: 1e-7 to 9e-7)
SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module", autouse=True)
def cache(pipeline_cache):
    return pipeline_cache


@pytest.fixture(scope="module")
def pipe(cache):
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_model("tiny-v"), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_the_chain_is_the_v_pipelines_own_sampler(pipe, sampler, rescale):
    task = TASKS.create(f"sd[model=tiny-v,batch=2,sampler={sampler},guidance_rescale={rescale}]")
    task.setup(torch.device("cpu"))
    pipe.scheduler = SCHEDULERS[sampler].from_config(pipe.scheduler.config)
    for target in ("latent", "weights"):
        problem = task.make_problem(target, 4, 0)
        with torch.no_grad():
            ours = problem.chain.sample(problem.x_start, problem.cond)
        theirs = pipe(
            prompt=task.prompt_list[:2],
            num_inference_steps=4,
            guidance_scale=task.guidance,
            guidance_rescale=rescale,
            latents=problem.x_start.clone(),
            output_type="latent",
        ).images
        assert rel_err(ours.flatten(), theirs.flatten()) < MATCH, target
    # the same U-Net read as an epsilon model samples something else entirely
    as_epsilon = TASKS.create(f"sd[batch=2,sampler={sampler},guidance_rescale={rescale}]")
    as_epsilon.setup(torch.device("cpu"))
    as_epsilon.unet.load_state_dict(task.unet.state_dict())
    other = as_epsilon.make_problem("latent", 4, 0)
    with torch.no_grad():
        assert rel_err(other.chain.sample(other.x_start, other.cond).flatten(), theirs.flatten()) > 1000 * MATCH


@pytest.fixture(scope="module")
def sd_v(cache):
    task = TASKS.create("sd[model=tiny-v,batch=2]")
    task.setup(torch.device("cpu"))
    return task


def _gradient(task, spec, target, steps):
    problem = task.make_problem(target, steps, 0)
    ESTIMATORS.create(spec)(problem, random.Random(0))
    return problem.flat_grad().clone()


@pytest.mark.parametrize("target", ["latent", "cond", "weights"])
def test_checkpoint_agrees_with_full_on_the_v_model(sd_v, target):
    full = _gradient(sd_v, "full", target, 3)
    assert float(full.norm()) > 0 and cosine(full, _gradient(sd_v, "checkpoint", target, 3)) > 0.9999


def test_the_adjoint_converges_to_full_on_the_v_model(sd_v):
    """The adjoint calls the v model between grid points, where abar(t) is interpolated: its
    gradient approaches the exact one as N grows (measured cosine 0.64 at N = 12, 0.97 at 40)."""
    cosines = [cosine(_gradient(sd_v, "full", "latent", n), _gradient(sd_v, "adjoint", "latent", n)) for n in (12, 40)]
    assert cosines[1] > 0.95 and cosines[1] > cosines[0] + 0.2, cosines


@pytest.mark.slow
def test_the_default_estimators_run_on_the_v_model_on_every_target(cache, tmp_path):
    rows = sweep_rows("sd[model=tiny-v,batch=1]", tmp_path / "run")
    checkpoint = [r for r in rows if r["estimator"] == "checkpoint"]
    assert all(r["status"] == "ok" and r["grad_cos"] >= 0.9999 for r in checkpoint), checkpoint
