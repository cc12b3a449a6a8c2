"""The planner: its fake-tensor counts equal the same counts on real tensors, its planned peaks
agree with the peaks the suite measures, and `python -m bench plan` answers for the real models in
seconds, refusing bad input in one line."""

import json
import time

import pytest
import torch

from bench.cli import main
from bench.planner.models import architecture
from bench.planner.table import PlanSpec, parse_bytes, plan_rows, plan_units
from bench.planner.units import count_module, denoiser_inputs
from bench.run.runner import SweepSpec, run_sweep

TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 16,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "norm_num_groups": 16,
}


@pytest.mark.parametrize("kind", ["input", "lora", "full"])
def test_the_fake_count_equals_the_count_on_real_tensors(kind):
    from diffusers import UNet2DConditionModel

    arch = architecture("sd1.5")
    arch = type(arch)(**{**arch.__dict__, "denoiser": TINY_UNET})

    def build():
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(TINY_UNET)

    def inputs():
        return denoiser_inputs(arch, 2, 128, torch.float32)

    counts = [count_module(build, inputs, kind, 4, lambda i: i["sample"], fake=fake) for fake in (True, False)]
    fake, real = counts
    for key in ("params", "trainable", "activations", "activations_checkpointed", "flops_forward", "flops_backward"):
        assert fake[key] == real[key], (key, fake[key], real[key])
    assert fake["activations"] > fake["activations_checkpointed"] > 0


@pytest.mark.slow
def test_planned_peaks_agree_with_the_measured_ones_on_the_tiny_pipeline(tmp_path):
    """One gradient's peak above what is resident (weights, optimiser state), planned from the
    pipeline folder's configs, against the peak the memory worker measures: within 10 %."""
    from tasks.sd.task import resolve_model

    spec = SweepSpec(
        tasks=["sd[model=tiny]"], estimators=["full", "sdo"], targets=["latent"], steps=[2], iters=0, rounds=1
    )
    rows = run_sweep(spec, tmp_path / "run")
    plan = PlanSpec(architecture(str(resolve_model("tiny"))), 32, 2, batch=2, dtype="fp32", target="latent")
    planned = {r.estimator: r for r in plan_rows(plan, plan_units(plan), ["full", "sdo"])}
    assert {r["estimator"] for r in rows if r["status"] == "ok"} == {"full", "sdo"}, rows
    for row in rows:
        p = planned[row["estimator"]]
        ratio = (p.total - p.weights - p.optimiser) / row["peak_mem_bytes"]
        assert 0.9 < ratio < 1.1, (row["estimator"], ratio)


@pytest.mark.slow
def test_flux_dev_is_planned_in_under_a_minute(capsys):
    start = time.perf_counter()
    argv = [
        "plan",
        "--model",
        "flux.1-dev",
        "--resolution",
        "1024",
        "--steps",
        "28",
        "--dtype",
        "bf16",
        "--target",
        "lora",
    ]
    assert main([*argv, "--device-memory", "80GB"]) == 0
    assert time.perf_counter() - start < 60
    out = capsys.readouterr().out
    assert "11.90 B parameters" in out and "| full | N·A | 28 / 28 |" in out
    full = next(line for line in out.splitlines() if line.startswith("| full |"))
    sdo = next(line for line in out.splitlines() if line.startswith("| sdo |"))
    assert full.count("**no**") == 1 and "| yes |" in sdo  # 28 calls' graphs do not fit 80 GB, one does


def test_the_cost_model_decides_what_is_alive_together():
    """full keeps its calls' graphs while the VAE's graph is alive, checkpoint recomputes after the
    reward's backward: its peak is the larger of the two, not their sum."""
    arch = architecture("sd1.5")
    spec = PlanSpec(arch, 256, 4, dtype="fp32", target="latent")
    unit = plan_units(spec)
    rows = {r.estimator: r for r in plan_rows(spec, unit, ["full", "checkpoint", "sdo", "zeroth-order"])}
    resident = unit.param_bytes + unit.vae_param_bytes + unit.state
    assert rows["full"].total == resident + 4 * unit.activations + unit.vae_activations
    assert rows["checkpoint"].total == resident + 4 * unit.state + max(unit.vae_activations, unit.activations)
    # sdo's later calls run without a graph beside its kept one; zeroth-order keeps no graph at all
    assert rows["sdo"].total == resident + unit.activations + max(unit.vae_activations, unit.working)
    assert rows["zeroth-order"].total == resident + unit.working and rows["zeroth-order"].vae == 0
    assert 0 < unit.working < unit.activations
    no_vae = PlanSpec(arch, 256, 4, dtype="fp32", target="latent", vae_in_backward=False)
    rows = {r.estimator: r for r in plan_rows(no_vae, unit, ["full", "sdo"])}
    assert rows["full"].total == resident + 4 * unit.activations
    assert rows["sdo"].total == resident + unit.activations + unit.working


def test_a_model_folder_is_read_from_its_configs_alone(tmp_path):
    folder = tmp_path / "my-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}))
    arch = architecture(str(folder))
    assert arch.family == "unet" and arch.denoiser["cross_attention_dim"] == 32
    assert arch.vae_scale == 8  # the SD VAE when the folder has none


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "flux-dev"], "did you mean 'flux.1-dev'"),
        (["--model", "sdxl", "--resolution", "1000"], "needs a positive multiple of 32"),
        (["--model", "sd1.5", "--dtype", "int8"], "--dtype 'int8': give one of"),
        (["--model", "sd1.5", "--target", "gates"], "--target 'gates': give one of"),
        (["--model", "sd1.5", "--device-memory", "lots"], "give a size such as 24GiB"),
        (["--model", "sd1.5", "--steps", "0"], "--steps 0: give a positive integer"),
        (["--model", "sd1.5", "--estimators", "ful"], "did you mean"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_folder_without_a_config_is_refused(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "no config.json there or in unet/ or transformer/" in capsys.readouterr().err


def test_device_sizes_parse_as_sold_and_as_binary():
    assert parse_bytes("24GiB") == 24 * 1024**3 and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("141 GB") == 141 * 10**9 and parse_bytes("512MiB") == 512 * 1024**2


def test_times_from_units_measured_on_the_present_device(tmp_path, capsys):
    """--measure: F and V timed on this CPU (random weights built from the folder's configs), and
    every row's time is forwards·F + VJPs·V + the VAE decode and its backward."""
    from bench.planner.timed import MeasuredUnits

    folder = tmp_path / "my-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}))
    argv = ["plan", "--model", str(folder), "--resolution", "64", "--steps", "3", "--dtype", "fp32", "--measure"]
    assert main([*argv, "--estimators", "full,sdo"]) == 0
    out = capsys.readouterr().out
    assert "measured on this CPU" in out and "median of 3 rounds" in out and "| full |" in out, out
    measured = MeasuredUnits("a device", forward=0.5, backward=1.0, vae_forward=0.25, vae_backward=2.0, rounds=3)
    spec = PlanSpec(architecture(str(folder)), 64, 3, dtype="fp32", target="latent")
    rows = {r.estimator: r for r in plan_rows(spec, plan_units(spec), ["full", "sdo"], measured)}
    assert rows["full"].seconds == 3 * 0.5 + 3 * 1.0 + 0.25 + 2.0
    assert rows["sdo"].seconds == 3 * 0.5 + 1.0 + 0.25 + 2.0  # its kept call (the first) is the one VJP


def test_gate_flops_under_fake_tensors_equal_the_count_on_real_tensors_and_the_static_patterns_add_up():
    """The planner's gate table: each gated block's FLOPs counted under fake tensors equal the same
    count on a real network; an N-step pattern's operations fraction is the computed blocks' share."""
    from diffusers import UNet2DConditionModel

    from bench import gating
    from bench.planner import gates

    arch = architecture("sd1.5")
    arch = type(arch)(**{**arch.__dict__, "denoiser": TINY_UNET})
    fake = gates.block_flops(arch, 128, 1, "fp32")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY_UNET)
    inputs = denoiser_inputs(arch, 2, 128, torch.float32)
    with torch.no_grad():
        real = gating.block_flops(unet, lambda: unet(**inputs))
    assert fake == real and list(fake) == ["down0", "down1", "mid", "up0", "up1", "rest"]
    assert all(v > 0 for v in fake.values())
    steps, total = 4, sum(fake.values())
    reuse2 = gating.static_patterns(steps, 5)["reuse2"]  # steps 3 and 1 reuse every block, step 2 computes
    assert gating.flops_fraction(reuse2, fake) == pytest.approx((2 * total + 2 * fake["rest"]) / (4 * total))


def test_plan_states_the_gates_operations_of_a_model_folder(tmp_path, capsys):
    pattern = tmp_path / "pattern.json"
    model = tmp_path / "model"  # a U-Net folder, configs only: the small U-Net's 2 + 1 + 2 blocks
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_UNET}))
    pattern.write_text(json.dumps([[1] * 5, [0] * 5, [1, 0, 0, 0, 1]]))
    argv = ["plan", "--model", str(model), "--estimators", "full", "--steps", "4", "--resolution", "128"]
    assert main([*argv, "--gates", "--gate-pattern", str(pattern)]) == 0
    out = capsys.readouterr().out
    assert "5 gated blocks" in out and "| down0 |" in out and "| mid |" in out and "| up1 |" in out
    row = next(line for line in out.splitlines() if line.startswith("| file pattern.json"))
    fraction = float(row.split("|")[2])
    assert 0.5 < fraction < 0.75  # steps 4 and 3 all, step 2 none, step 1 down0 and up1, and the rest
    pattern.write_text("[[1, 0]]")
    assert main([*argv, "--gates", "--gate-pattern", str(pattern)]) == 2
    err = capsys.readouterr().err
    assert "expected N - 1 = 3 rows (steps N-1..1) of 5 gates" in err and err.count("\n") == 1
    assert main([*argv, "--gate-pattern", str(pattern)]) == 2
    assert "--gate-pattern needs --gates" in capsys.readouterr().err


def test_attention_is_counted_on_the_cpu_as_its_matrix_products():
    """torch's counter has no formula for the CPU attention kernel: the suite's counter (every FLOP
    count of the planner and the gates) gives it torch's GPU formula, which is exactly the count of
    the same attention computed by explicit matrix products (diffusers' AttnProcessor)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from bench.measure.flops import flop_counter

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY_UNET).eval()
    arch = architecture("sd1.5")
    inputs = denoiser_inputs(type(arch)(**{**arch.__dict__, "denoiser": TINY_UNET}), 2, 128, torch.float32)

    def count(counter):
        with torch.no_grad(), counter as mode:
            unet(**inputs)
        return mode.get_total_flops()

    fused, torch_own = count(flop_counter()), count(FlopCounterMode(display=False))
    unet.set_attn_processor(AttnProcessor())
    assert fused == count(FlopCounterMode(display=False)) > torch_own
