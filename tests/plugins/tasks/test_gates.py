"""DiP-GO's gates: the gated network against diffusers' own forward on every denoiser the suite
loads (the digits U-Net and transformer, tiny SD, SDXL, SD3 and FLUX networks), the straight-through
gradient against finite differences, the estimators that drive it, bad input."""

import json
import random

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from bench.results import figures
from bench.results.analysis import load_run
from bench.cli import main
from bench.registry import ESTIMATORS, TASKS
from estimators.masked_chain import run_masked_chain
from digits_fixtures import write_random_models
from bench import gating as gates
from tasks.digits.model import TRANSFORMER_CONFIG, UNET_CONFIG
from tasks.flux import tiny as flux_tiny
from tasks.sd import tiny as sd_tiny
from tasks.sd3 import tiny as sd3_tiny
from tasks.sdxl import tiny as sdxl_tiny

STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_models(tmp_path_factory.mktemp("gates"))


@pytest.fixture(scope="module")
def task(folder):
    task = TASKS.create(f"digits[models={folder},batch=2,gate_keep=0.3]")
    task.setup(torch.device("cpu"))
    return task


def _problem(task, pattern=None, steps=STEPS):
    problem = task.make_problem("gates", steps, 0, dtype=torch.float64)
    if pattern is not None:  # logits +-1 in the given 0/1 pattern
        with torch.no_grad():
            problem.leaves[0].copy_(torch.tensor(pattern, dtype=torch.float64) * 2 - 1)
    return problem


MIXED = [[1, 0, 1, 0, 1], [0, 1, 1, 0, 0]]  # steps 2 and 1: some blocks reused at each


def test_all_open_gates_are_diffusers_own_forward_and_closed_ones_hand_on_the_last_output():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).double().eval()
    x, cond = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 4, 32, dtype=torch.float64)
    times = [700.0, 400.0, 100.0]

    def eps(gated, t, x_in):
        return gated(x_in, torch.full((3,), t, dtype=torch.float64), cond).sample

    with torch.no_grad():
        everything = gates.GatedNetwork(unet, times, torch.ones(2, 5, dtype=torch.bool))
        assert everything.labels == ["down0", "down1", "mid", "up0", "up1"]
        for t in times:  # every step of an all-open pass is the model itself
            x_t = x * (1 + t / 1000)
            assert torch.equal(
                eps(everything, t, x_t),
                unet(x_t, torch.full((3,), t, dtype=torch.float64), encoder_hidden_states=cond).sample,
            )
        nothing = gates.GatedNetwork(unet, times, torch.zeros(2, 5, dtype=torch.bool))
        first = eps(nothing, 700.0, x)
        assert torch.equal(eps(nothing, 400.0, x * 2), first)  # every block reused: the same output
        assert (nothing.counter.computed, nothing.counter.reused) == (5, 5)
        deep = gates.GatedNetwork(unet, times, gates.pattern(3, 5, "deepcache", 2))  # step 2 shallow, step 1 full
        eps(deep, 700.0, x)
        shallow = eps(deep, 400.0, x * 2)
        assert not torch.equal(shallow, first)  # the shallow branch saw the new input
        assert not torch.allclose(
            shallow, unet(x * 2, torch.full((3,), 400.0, dtype=torch.float64), encoder_hidden_states=cond).sample
        )  # the deep one did not
        eps(deep, 100.0, x)
        assert (deep.counter.computed, deep.counter.reused) == (5 + 2 + 5, 3)
        with pytest.raises(RuntimeError, match="in order"):
            gates.GatedNetwork(unet, times, torch.ones(2, 5, dtype=torch.bool))(x, torch.full((3,), 400.0), cond)
        with pytest.raises(RuntimeError, match="off its sampler's grid"):
            everything(x, torch.full((3,), 555.0, dtype=torch.float64), cond)


def _network_and_inputs(kind):
    """A denoiser network of each kind the suite loads (random weights, from the tiny configs), its
    keyword inputs at one timestep, and the blocks the gates should find."""
    torch.manual_seed(0)
    b, d = 2, torch.float64
    if kind in ("sd", "sdxl", "digits-unet"):
        config = {"sd": sd_tiny.UNET, "sdxl": sdxl_tiny.UNET, "digits-unet": UNET_CONFIG}[kind]
        net = UNet2DConditionModel(**config)
        c, side = net.config.in_channels, net.config.sample_size
        inputs = {
            "sample": torch.randn(b, c, side, side, dtype=d),
            "encoder_hidden_states": torch.randn(b, 4, net.config.cross_attention_dim, dtype=d),
        }
        if kind == "sdxl":
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(b, sdxl_tiny.POOLED, dtype=d),
                "time_ids": torch.randn(b, 6, dtype=d),
            }
        labels = ["down0", "down1", "mid", "up0", "up1"]
    elif kind in ("sd3", "digits-transformer"):
        config = sd3_tiny.TRANSFORMER if kind == "sd3" else TRANSFORMER_CONFIG
        net = SD3Transformer2DModel(**config)
        cfg = net.config
        inputs = {
            "hidden_states": torch.randn(b, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=d),
            "encoder_hidden_states": torch.randn(b, 5, cfg.joint_attention_dim, dtype=d),
            "pooled_projections": torch.randn(b, cfg.pooled_projection_dim, dtype=d),
        }
        labels = [f"block{i}" for i in range(cfg.num_layers)]
    else:  # flux: double-stream blocks, then single-stream ones
        net = FluxTransformer2DModel(**flux_tiny.TRANSFORMER)
        tokens = 16
        inputs = {
            "hidden_states": torch.randn(b, tokens, net.config.in_channels, dtype=d),
            "encoder_hidden_states": torch.randn(b, 5, net.config.joint_attention_dim, dtype=d),
            "pooled_projections": torch.randn(b, net.config.pooled_projection_dim, dtype=d),
            "img_ids": torch.randn(tokens, 3, dtype=d),
            "txt_ids": torch.zeros(5, 3, dtype=d),
            "guidance": torch.full((b,), 3.5, dtype=d),
        }
        labels = ["block0", "single0", "single1"]
    return net.double().eval(), inputs, labels


@pytest.mark.parametrize("kind", ["sd", "sdxl", "digits-unet", "sd3", "digits-transformer", "flux"])
def test_gates_are_built_from_each_networks_own_blocks_and_all_open_is_its_forward(kind):
    """Every gate open: each step of a pass equals the network's own forward (torch.equal). A
    closed U-Net block hands on its last output; a closed transformer block adds its last residual
    to the new input, so that the hidden states reaching the output head differ from the block
    inputs by the previous step's total residual."""
    net, inputs, labels = _network_and_inputs(kind)
    times = [0.9, 0.5, 0.2] if kind == "flux" else [900.0, 500.0, 200.0]
    x_name = "sample" if "sample" in inputs else "hidden_states"

    def call(network, t, scale):
        moved = {**inputs, x_name: inputs[x_name] * scale}
        return network(**moved, timestep=torch.full((2,), t, dtype=torch.float64)).sample

    with torch.no_grad():
        everything = gates.GatedNetwork(net, times, torch.ones(2, len(labels), dtype=torch.bool))
        assert everything.labels == labels
        for step, t in enumerate(times):
            assert torch.equal(call(everything, t, 1 + step / 3), call(net, t, 1 + step / 3)), (kind, t)
        assert everything.counter.reused == 0
        assert not any("forward" in block.module.__dict__ for block in everything.blocks)  # swapped back
        nothing = gates.GatedNetwork(net, times, torch.zeros(2, len(labels), dtype=torch.bool))
        first = call(nothing, times[0], 1.0)
        if kind in ("sd", "sdxl", "digits-unet"):
            assert torch.equal(call(nothing, times[1], 2.0), first)  # every block reused: the same output
            return
        seen = {}
        head = net.norm_out
        hooks = [
            nothing.blocks[0].module.register_forward_pre_hook(
                lambda m, a, k: seen.setdefault("in", []).append(k["hidden_states"]), with_kwargs=True
            ),
            head.register_forward_pre_hook(lambda m, a: seen.setdefault("out", []).append(a[0])),
        ]
        nothing = gates.GatedNetwork(net, times, torch.zeros(2, len(labels), dtype=torch.bool))
        call(nothing, times[0], 1.0)
        second = call(nothing, times[1], 2.0)
        for hook in hooks:
            hook.remove()
        assert not torch.equal(second, first)
        if kind == "flux":  # the single blocks see text and image tokens; the head sees the image's
            return
        torch.testing.assert_close(seen["out"][1] - seen["in"][1], seen["out"][0] - seen["in"][0])
        assert (nothing.counter.computed, nothing.counter.reused) == (len(labels), len(labels))


def test_the_gates_gradient_is_the_straight_through_derivative(task, monkeypatch):
    """d loss / d z = d loss / d g at the hard gates, times sigma'(z): the derivative in g taken by
    central differences on a chain whose gates are continuous mixing weights."""
    problem = _problem(task, MIXED)
    ESTIMATORS.create("full")(problem, random.Random(0))
    logits = problem.leaves[0]
    grad = logits.grad.clone()
    assert float(problem.penalty()) > 0  # the sparsity term is active (keep 0.3) and differentiated too

    monkeypatch.setattr(gates, "straight_through", lambda g: g)  # gates are the mixing weights themselves
    hard = (logits.detach() > 0).to(torch.float64)
    gated = problem.chain.denoiser.unet
    assert isinstance(gated, gates.GatedNetwork)

    def loss_at(g):  # the chain with its graph recorded, so that every block is computed and mixed by g
        g = g.clone().requires_grad_(True)
        gated.gates = g
        problem.penalty = lambda: task_settings.penalty(g, task.block_flops())
        return float(problem.loss(run_masked_chain(problem, lambda i: True, keep_latent_path=True))[0])

    task_settings = gates.GateSettings(task.gate_keep, task.gate_sparsity)
    h = 1e-6
    expected = torch.zeros_like(hard)
    for index in range(hard.numel()):
        step = torch.zeros(hard.numel(), dtype=torch.float64)
        step[index] = h
        step = step.view_as(hard)
        expected.view(-1)[index] = (loss_at(hard + step) - loss_at(hard - step)) / (2 * h)
    sigma = torch.sigmoid(logits.detach())
    expected *= sigma * (1 - sigma)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_in_order_estimators_drive_the_gates_and_the_rest_skip(task):
    def gradient(spec):
        problem = _problem(task, MIXED)
        estimator = ESTIMATORS.create(spec)
        assert estimator.applies(problem) is None, spec
        problem.chain.counter.reset()
        estimator(problem, random.Random(0))
        cost = estimator.cost_for(problem)
        if spec != "checkpoint[recursive=true]":  # its model counts a replay of step N, which saves nothing here
            assert (problem.chain.counter.forward, problem.chain.counter.vjp) == (cost.nfe_forward, cost.nfe_vjp), spec
        if spec.startswith(("full", "checkpoint")):  # step N's output depends on no gate
            assert problem.chain.counter.vjp == STEPS - 1, spec
        return problem.flat_grad().view(STEPS - 1, 5)

    exact = gradient("full")
    for spec in ("checkpoint", "checkpoint[segment=2]", "checkpoint[recursive=true]", f"truncated[k={STEPS}]"):
        torch.testing.assert_close(gradient(spec), exact, rtol=1e-10, atol=1e-12)
    # truncated[k=1]: step 1's gates get the whole gradient, step 2's only the sparsity term's
    last = gradient("truncated[k=1]")
    flops = task.block_flops()
    z = _problem(task, MIXED).leaves[0].detach()
    sparsity = (
        task.gate_sparsity
        * torch.tensor([flops[b] for b in ("down0", "down1", "mid", "up0", "up1")], dtype=torch.float64)
        / (STEPS * sum(flops.values()))
        * torch.sigmoid(z)
        * (1 - torch.sigmoid(z))
    )
    torch.testing.assert_close(last[1], exact[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(last[0], sparsity[0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(exact[0], sparsity[0])
    # hard gates are piecewise constant: small random perturbations see no change at all
    assert torch.count_nonzero(gradient("zeroth-order[n=2]")) == 0

    problem = _problem(task)
    for spec in ("sdo", "adjoint", "draft-lv", "edict"):
        reason = ESTIMATORS.create(spec).applies(problem)
        able = reason.split("estimators that serve it: ")[1].split(", ")  # (tests register subclasses too)
        assert "previous step" in reason and {"checkpoint", "full", "truncated", "zeroth-order"} <= set(able)
        assert spec not in able


def test_bad_gate_input_is_one_line(capsys, folder):
    for argv, needle in (
        (["--tasks", "toy", "--targets", "gates"], "tasks with gates: digits"),
        (["--tasks", f"digits[models={folder}]", "--targets", "gates", "--steps", "1"], "N >= 2"),
        (["--tasks", f"digits[models={folder},gate_keep=0]", "--targets", "gates"], "gate_keep"),
    ):
        code = main(["run", *argv, "--estimators", "full", "--iters", "1", "--out", str(folder / "never")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and "\n" not in err and "Traceback" not in err, err
    assert not (folder / "never" / "rows.jsonl").exists()


def test_a_gate_search_is_a_row_with_the_deployed_sampler_and_its_baselines(tmp_path, folder):
    out = tmp_path / "run"
    main(
        [
            "run",
            "--tasks",
            f"digits[models={folder},batch=2,fid_samples=8]",
            "--targets",
            "gates",
            "--steps",
            str(STEPS),
            "--estimators",
            "full,sdo",
            "--iters",
            "2",
            "--rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = {row["estimator"]: row for row in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert rows["sdo"]["status"] == "skipped" and "previous step" in rows["sdo"]["reason"]
    row = rows["full"]
    assert row["status"] == "ok" and row["nfe_vjp"] == STEPS - 1 and row["grad_cos"] == pytest.approx(1.0)
    assert row["eval_reference"].startswith("held-out digits of class 1")  # the conditioning class
    for name in ("pruned", "deepcache2", "reuse2"):
        assert row[f"eval_{name}_speedup"] > 0 and 0 < row[f"eval_{name}_block_fraction"] <= 1
        assert 0 <= row[f"eval_{name}_accuracy"] <= 1 and row[f"eval_{name}_consistency_mse"] >= 0
    assert row["eval_reuse2_block_fraction"] == pytest.approx(10 / 15)  # steps 3 and 1 computed, step 2 reused
    frame, _ = load_run(out)
    fig, text = figures.KINDS["pruning"](frame, steps=STEPS)
    assert "searched" in text.lower() and "deepcache2" in text


@pytest.mark.parametrize("spec", ["flux[batch=1]"])  # sd: tests/results/test_papers.py (dipgo_sd15)
def test_the_gate_search_runs_on_the_pipeline_tasks_with_its_baselines(spec, tmp_path, pipeline_cache):
    """The gates target of the pipeline tasks (sd's code serves sdxl, flux's sd3 and flux with its
    timestep scale): the search's gradient agrees with the float64 reference, the deployed sampler
    and the static baselines are in the row."""
    out = tmp_path / "run"
    argv = ["run", "--tasks", spec, "--targets", "gates", "--steps", "3", "--estimators", "full,sdo"]
    assert main([*argv, "--iters", "1", "--rounds", "1", "--out", str(out)]) == 0
    rows = {row["estimator"]: row for row in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert rows["sdo"]["status"] == "skipped" and "previous step" in rows["sdo"]["reason"]
    row = rows["full"]
    assert row["status"] == "ok" and row["nfe_vjp"] == 2 and row["grad_cos"] == pytest.approx(1.0, abs=1e-6)
    for name in ("pruned", "reuse2"):
        assert row[f"eval_{name}_speedup"] > 0 and 0 < row[f"eval_{name}_flops_fraction"] <= 1
        assert row[f"eval_{name}_consistency_mse"] >= 0 and f"eval_{name}_reward" in row
    assert row["eval_reuse2_block_fraction"] == pytest.approx(2 / 3)  # steps 3 and 1 computed, step 2 reused


def test_gates_refuse_checkpointed_blocks_in_one_line(tmp_path, capsys, pipeline_cache):
    argv = ["run", "--tasks", "sd[checkpoint_blocks=true]", "--targets", "gates", "--estimators", "full"]
    assert main([*argv, "--iters", "1", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint_blocks" in err and "\n" not in err


def test_the_digits_transformer_searches_gates_over_its_six_blocks():
    """digits[model=transformer]: gates per joint block (residual reuse), the search's gradient
    that of the float64 problem, the deployed sampler and the static baselines in its evaluation."""
    task = TASKS.create("digits[model=transformer,batch=2,fid_samples=4]")
    task.setup(torch.device("cpu"))
    assert list(task.block_flops()) == [f"block{i}" for i in range(6)] + ["rest"]
    grads = []
    for dtype in (torch.float32, torch.float64):
        problem = task.make_problem("gates", 3, 0, dtype=dtype)
        ESTIMATORS.create("full")(problem, random.Random(0))
        grads.append(problem.flat_grad().double())
        assert problem.chain.counter.vjp == 2 and problem.leaves[0].shape == (2, 6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-7)
    with torch.no_grad():
        x0 = problem.chain.sample(problem.x_start, problem.cond, problem.noises)
    metrics = task.evaluate(problem, x0)
    assert metrics["reuse2_block_fraction"] == pytest.approx(2 / 3) and metrics["deepcache2_block_fraction"] < 1
