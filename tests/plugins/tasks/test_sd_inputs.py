"""sd input the command line refuses before anything runs (one line on stderr, exit status 2,
no row written): broken model folders, resolutions the VAE cannot decode, binary prompt files,
reward functions that cannot be called as function(images) or exit while loading; and a reward
that calls sys.exit() while scoring, which fails its cells and never ends the sweep."""

import json
import shutil

import pytest

from bench.cli import main
from bench.registry import TASKS
from tasks.sd.task import resolve_model


@pytest.fixture(scope="module", autouse=True)
def cache(pipeline_cache):
    return pipeline_cache


def _edit_json(path, **changes):
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _break_scheduler_json(model):
    (model / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000,')


def _bad_scheduler_value(model):
    _edit_json(model / "scheduler" / "scheduler_config.json", beta_schedule="nonsense")


def _bad_scheduler_steps(model):
    _edit_json(model / "scheduler" / "scheduler_config.json", num_train_timesteps="many")


def _break_unet_json(model):
    (model / "unet" / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")


def _deeply_nested_unet_json(model):
    (model / "unet" / "config.json").write_text("[" * 100_000)


def _unet_without_keys(model):
    _edit_json(model / "unet" / "config.json", block_out_channels=None, cross_attention_dim=None)


def _unet_config_a_list(model):
    (model / "unet" / "config.json").write_text("[1, 2, 3]")


def _no_unet_weights(model):
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()


def _only_a_variant(model):
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))


def _no_vae_weights(model):
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()


def _text_width_mismatch(model):
    _edit_json(model / "unet" / "config.json", cross_attention_dim=64)


def _inpainting_unet(model):
    _edit_json(model / "unet" / "config.json", in_channels=9)


BROKEN_MODELS = [
    (_break_scheduler_json, "scheduler_config.json is not readable JSON"),
    (_bad_scheduler_value, "scheduler_config.json does not make a scheduler"),
    (_bad_scheduler_steps, "num_train_timesteps='many' is not a positive integer"),
    (_break_unet_json, "unet/config.json is not readable JSON"),
    (_deeply_nested_unet_json, "unet/config.json is not readable JSON (RecursionError"),
    (_unet_without_keys, "unet/config.json lacks block_out_channels, cross_attention_dim"),
    (_unet_config_a_list, "holds a JSON list, not an object of settings"),
    (_no_unet_weights, "no weights in"),
    (_only_a_variant, "found only diffusion_pytorch_model.fp16.safetensors (variants are not loaded)"),
    (_no_vae_weights, "no weights in"),
    (_text_width_mismatch, "the U-Net attends to 64-wide text embeddings but the text encoder gives 32-wide"),
    (_inpainting_unet, "the U-Net takes 9 input channels but the VAE's latents have 4"),
]


def _refused(tmp_path, capsys, task, message):
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--tasks",
            task,
            "--estimators",
            "full",
            "--targets",
            "latent",
            "--steps",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not list(tmp_path.rglob("rows.jsonl"))


@pytest.mark.parametrize("damage,message", BROKEN_MODELS, ids=[d.__name__.strip("_") for d, _ in BROKEN_MODELS])
def test_a_broken_model_folder_is_refused_in_one_line(tmp_path, capsys, damage, message):
    model = tmp_path / "my-sd"
    shutil.copytree(resolve_model("tiny"), model)
    damage(model)
    _refused(tmp_path, capsys, f"sd[model={model}]", message)


def test_configs_and_prompts_with_a_byte_order_mark_are_accepted(tmp_path):
    """A UTF-8 byte-order mark is valid UTF-8 (Windows editors write one)."""
    model = tmp_path / "my-sd"
    shutil.copytree(resolve_model("tiny"), model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_bytes(b"\xef\xbb\xbf" + scheduler.read_bytes())
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa red fox\n\n".encode())
    task = TASKS.create(f"sd[model={model},prompts={prompts}]")
    task.preflight()
    assert task.prompt_list == ["a red fox"] and task.train_timesteps == 1000


def _write_files(tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"a photo of a cat\n\x00\x01\x02\xff\n")
    (tmp_path / "latin1.txt").write_bytes("une photo d'un ch\u00e2teau\n".encode("latin-1"))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "wrong_signature.py").write_text(
        "def two(images, scale):\n    return images.mean((1, 2, 3))\ndef none():\n    return 0\n"
    )
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(4)\n")


BAD_OPTIONS = [
    ("resolution=13", "sd[resolution=13]: must be a multiple of 2 (the VAE's downsampling)"),
    ("resolution=2", "sd[resolution=2]: must be a multiple of 2 (the VAE's downsampling) and at least 4"),
    ("prompts={tmp}/binary.txt", "not a text file (it holds NUL bytes)"),
    ("prompts={tmp}/latin1.txt", "not UTF-8 text (byte 0xe2 at offset 17)"),
    ("negative_prompt_file={tmp}/binary.txt", "not a text file (it holds NUL bytes)"),
    ("negative_prompt_file={tmp}/nowhere.txt", "no such file (the negative prompt)"),
    ("prompt=a dog,prompts={tmp}/prompts.txt", "give prompt= (one prompt) or prompts= (a file), not both"),
    ("negative_prompt=x,negative_prompt_file={tmp}/prompts.txt", "not both"),
    ("guidance_rescale=1.5", "must be in [0, 1]"),
    ("guidance=1,guidance_rescale=0.7", "guidance_rescale acts on classifier-free guidance, which guidance=1"),
    ("guidance=1,negative_prompt=blurry", "negative_prompt acts on classifier-free guidance"),
    ("reward={tmp}/wrong_signature.py:two", "cannot be called as function(images) (missing a required argument"),
    ("reward={tmp}/wrong_signature.py:none", "cannot be called as function(images) (too many positional"),
    ("reward={tmp}/exits_on_import.py:r", "loading it called sys.exit(4)"),
]


@pytest.mark.parametrize("option,message", BAD_OPTIONS, ids=[o.replace("{tmp}/", "") for o, _ in BAD_OPTIONS])
def test_bad_sd_options_are_refused_in_one_line(tmp_path, capsys, option, message):
    _write_files(tmp_path)
    _refused(tmp_path, capsys, f"sd[batch=1,{option.replace('{tmp}', str(tmp_path))}]", message)


def test_a_reward_that_calls_sys_exit_fails_its_cells_and_the_sweep_goes_on(tmp_path, capsys):
    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\n\ndef score(images):\n    sys.exit(4)\n")
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--tasks",
            f"sd[batch=1,reward={plugin}:score]",
            "--estimators",
            "full,sdo",
            "--targets",
            "latent",
            "--steps",
            "2",
            "--iters",
            "0",
            "--rounds",
            "1",
            "--no-memory",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    capsys.readouterr()
    assert code == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert sorted(row["estimator"] for row in rows) == ["full", "sdo"]
    for row in rows:
        assert row["status"] == "error", row
        assert f"reward={plugin}:score called sys.exit(4) while scoring images" in row["error"]
