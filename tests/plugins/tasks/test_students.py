"""Few-step students on the pipeline tasks (tasks/shortcut): a LoRA made dense is what diffusers
fuses, a checkpoint's delta is the difference of the weights, a student the repo distils on tiny sd
follows the long chain and gives shortcut-model rows with its trajectory error, one that does not
is skipped with the error and the bound, and bad input is one line."""

import json
import random

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from bench.capabilities import FEW_STEP_CHAIN
from bench.cli import main
from bench.errors import SpecError
from bench.registry import ESTIMATORS, TASKS
from bench.run.runner import SweepSpec, run_sweep
from tasks.sd.task import STUDENT_BOUND, resolve_model
from tasks.shortcut import Student, __main__ as cli
from tasks.shortcut.sources import DELTA, RECORD

K = 2  # the students' step count: the 2-step grid lies on the 20-step one (leading spacing)


@pytest.fixture(scope="module", autouse=True)
def cache(pipeline_cache):
    return pipeline_cache


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A 2-step student of tiny sd distilled by the repo's CLI (16 trajectories of 20 steps, 300
    training steps of 2 samples: about 15 s on two cores)."""
    folder = tmp_path_factory.mktemp("distilled")
    threads = torch.get_num_threads()
    argv = ["--task", "sd[model=tiny]", "--steps", str(K), "--out", str(folder), "--trajectories", "16"]
    assert cli.main(argv) == 0
    torch.set_num_threads(threads)
    return folder


def _task(options=""):
    task = TASKS.create(f"sd[batch=2{',' + options if options else ''}]")
    task.setup(torch.device("cpu"))
    return task


def _write_delta(folder, delta, steps=K):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in delta.items()}, folder / DELTA)
    (folder / RECORD).write_text(json.dumps({"steps": steps}))
    return folder


def _tiny_unet():
    return UNet2DConditionModel.from_pretrained(resolve_model("tiny") / "unet", local_files_only=True)


def _inputs(problem):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(problem.x_start.shape, generator=generator)
    return x, torch.full((x.shape[0],), 501.0), problem.cond.detach()


def _kohya(state: dict, alpha: float) -> dict:
    """A peft-form LoRA in the kohya / A1111 key format, with its network alphas."""
    out = {}
    for key, value in state.items():
        module, _, part = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("form", ["metadata", "plain", "kohya"])
def test_a_lora_student_is_the_lora_diffusers_loads_and_fuses(tmp_path, form):
    """A random LoRA on attention and convolutions (rank 4), saved by the pipeline's
    save_lora_weights with alpha 8 in its adapter metadata, or without (scale 1), or written in the
    kohya format with alpha 2: the student's denoiser equals the guided U-Net with the LoRA loaded
    by load_lora_weights and fused."""
    unet = _tiny_unet()
    alpha = {"metadata": 8, "plain": 4, "kohya": 2}[form]
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["to_q", "to_v", "to_out.0", "conv1", "conv2"])
    unet.add_adapter(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    state = get_peft_model_state_dict(unet)
    file = tmp_path / "pytorch_lora_weights.safetensors"  # the student: a file, or its folder
    if form == "kohya":
        file = tmp_path / "kohya.safetensors"
        save_file(_kohya(state, alpha), file)
    else:
        metadata = {"unet_lora_adapter_metadata": config.to_dict()} if form == "metadata" else {}
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state, **metadata)

    task = _task(f"student={file if form == 'kohya' else tmp_path},student_steps={K}")
    problem = task.make_problem("latent", 4, 0)
    student = problem.extras[FEW_STEP_CHAIN](K).denoiser
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_model("tiny"), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(tmp_path, weight_name=file.name)
    pipe.fuse_lora()
    guided = problem.chain.denoiser
    with torch.no_grad():
        ours, plain = student(*_inputs(problem)), guided(*_inputs(problem))
        guided.unet = pipe.unet  # the student's own denoiser is this one: swapped after its call
        theirs = guided(*_inputs(problem))
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5
    assert float((plain - theirs).abs().max() / theirs.abs().max()) > 1e-2  # the LoRA matters


def test_a_checkpoint_student_is_its_own_network(tmp_path):
    """A distilled checkpoint (here: the tiny U-Net with every weight perturbed) in unet/: the
    delta is student - teacher, weight by weight, and the student's denoiser is the guided
    checkpoint."""
    unet = _tiny_unet()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    unet.save_pretrained(tmp_path / "unet")
    task = _task(f"student={tmp_path},student_steps={K}")
    problem = task.make_problem("latent", 4, 0)
    student = problem.extras[FEW_STEP_CHAIN](K).denoiser
    teacher = dict(task.unet.named_parameters())
    delta = task._student.delta(task.unet)
    assert set(delta) == set(teacher)
    for name, param in unet.named_parameters():
        assert torch.equal(delta[name], param.detach() - teacher[name].detach()), name
    guided = problem.chain.denoiser
    with torch.no_grad():
        ours = student(*_inputs(problem))
        guided.unet = unet.eval()  # the student's own denoiser is this one: swapped after its call
        theirs = guided(*_inputs(problem))
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5


def test_the_student_refuses_weights_the_network_lacks_or_shapes_it_does_not_have():
    problem = _task().make_problem("latent", 2, 0)
    with pytest.raises(SpecError, match="1 of its 1 weights are not in this network"):
        Student(problem.chain.denoiser, {"down_blocks.9.conv.weight": torch.zeros(1)})
    with pytest.raises(SpecError, match=r"conv_in.weight: \(1,\) against \(32, 4, 3, 3\)"):
        Student(problem.chain.denoiser, {"conv_in.weight": torch.zeros(1)})


def _sweep(tmp_path, task, steps=20, targets=("latent", "weights")):
    spec = SweepSpec(
        tasks=[task],
        estimators=[f"shortcut-model[steps={K}]"],
        targets=list(targets),
        steps=[steps],
        iters=0,
        rounds=1,
        memory="off",
    )
    return run_sweep(spec, tmp_path / "run")


def test_a_distilled_student_follows_the_long_chain_and_its_rows_say_how_closely(distilled, tmp_path):
    record = json.loads((distilled / RECORD).read_text())
    assert record["steps"] == K and record["teacher_steps"] == 20 and record["sampler"] == "ddim"
    for row in _sweep(tmp_path, f"sd[student={distilled}]"):
        assert row["status"] == "ok", row
        assert row["student_traj_points"] == 2  # x_1 and x_0
        assert row["student_traj_err"] < STUDENT_BOUND * row["student_plain_err"]
        assert row["nfe_forward"] == K and row["grad_cos"] > 0  # against the 20-step chain's exact gradient


@pytest.mark.parametrize("scale", [0.0, 0.05])
def test_a_student_that_does_not_follow_is_skipped_with_its_error_and_the_bound(tmp_path, scale):
    """The undistilled model (delta 0) and a random delta: each cell a skip row naming both numbers."""
    generator = torch.Generator().manual_seed(2)
    delta = {name: scale * torch.randn(p.shape, generator=generator) for name, p in _tiny_unet().named_parameters()}
    folder = _write_delta(tmp_path / "student", delta)
    (row,) = _sweep(tmp_path, f"sd[student={folder}]", targets=("latent",))
    assert row["status"] == "skipped", row
    assert "trajectory error" in row["reason"] and f"> student_bound {STUDENT_BOUND:g} x" in row["reason"], row


def test_the_student_is_in_the_key_only_where_given(distilled):
    plain, with_student = TASKS.create("sd"), TASKS.create(f"sd[student={distilled}]")
    assert plain.offers()[FEW_STEP_CHAIN] == [] and with_student.offers()[FEW_STEP_CHAIN] == [K]
    assert with_student.data_fingerprint() != plain.data_fingerprint()
    from tasks.sd.task import _fingerprint

    assert plain.data_fingerprint() == _fingerprint(resolve_model("tiny"))  # as before students existed


def test_with_eta_the_student_does_not_apply(distilled):
    problem = _task(f"student={distilled},eta=0.5").make_problem("latent", 4, 0)
    reason = ESTIMATORS.create(f"shortcut-model[steps={K}]").applies(problem)
    assert "follows its deterministic chain (eta 0" in reason


def test_the_transformer_of_digits_ships_a_student_that_follows_its_chain():
    task = TASKS.create("digits[model=transformer]")
    task.setup(torch.device("cpu"))
    (steps,) = task.offers()[FEW_STEP_CHAIN]
    estimator = ESTIMATORS.create(f"shortcut-model[steps={steps}]")
    estimator.check_task(task)
    problem = task.make_problem("latent", 40, 0)
    assert estimator.applies(problem) is None
    check = estimator.problem_fields(problem)
    assert check["student_traj_points"] == steps and check["student_traj_err"] < 0.5 * check["student_plain_err"]
    estimator(problem, random.Random(0))
    assert torch.isfinite(problem.flat_grad()).all()


def _lora_of_another_network(folder):
    """A LoRA whose modules this U-Net does not have (a block index it lacks)."""
    module = "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {f"{module}.lora_A.weight": torch.zeros(4, 32), f"{module}.lora_B.weight": torch.zeros(32, 4)},
        folder / "other.safetensors",
    )
    return folder / "other.safetensors"


def _bad_inputs(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / RECORD).write_text("{steps: 2")
    architecture = tmp_path / "wide" / "unet"
    architecture.mkdir(parents=True)
    config = json.loads((resolve_model("tiny") / "unet" / "config.json").read_text())
    (architecture / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 64]}))
    other = _lora_of_another_network(tmp_path)
    return {
        f"student={tmp_path / 'missing'}": "no such file or folder",
        f"student={tmp_path / 'garbage.safetensors'},student_steps=2": "not a LoRA StableDiffusionPipeline reads",
        f"student={tmp_path / 'broken'}": "student.json is not readable JSON",
        f"student={other},student_steps=2": "are not in this network (e.g. down_blocks.7.attentions",
        f"student={other}": "does not say its step count; set student_steps=K",
        f"student={tmp_path / 'wide'},student_steps=2": "another architecture than the task's unet: block_out_channels",
        "student_steps=4": "no student; set student=PATH",
    }


def test_bad_student_input_is_one_line(tmp_path, capsys):
    for option, message in _bad_inputs(tmp_path).items():
        assert main(["run", "--tasks", f"sd[{option}]", "--out", str(tmp_path / "run")]) == 2, option
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (option, err)


def test_a_distilled_student_for_other_steps_and_an_untaken_grid_are_one_line(distilled, tmp_path, capsys):
    assert main(["run", "--tasks", f"sd[student={distilled},student_steps=4]", "--out", str(tmp_path / "r")]) == 2
    assert "student_steps=4, but the student was distilled for 2 steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--task", "sd", "--steps", "3", "--segment", "2", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "--segment 3 works" in err, err
    with pytest.raises(SystemExit):
        cli.main(["--task", "sd[sampler=dpmpp2m]", "--steps", "2", "--out", str(tmp_path / "s")])
    assert "does not take single affine steps; valid: ddim (eta 0), flow-euler" in capsys.readouterr().err
