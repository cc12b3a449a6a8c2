"""examples/preference_rewards.py, the HPSv2 and ImageReward plug-in: it registers both rewards for
images, refuses them in one line (exit 2) when their packages, variables or files are missing, and
computes what the packages compute, differentiably, each sample against its own prompt.

Neither package nor any weights are available offline: the wiring is checked against stand-ins
that imitate the few parts of the packages the plug-in calls (named in each), with tiny random
networks; their values mean nothing, only the plumbing around them is under test."""

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.cli import main
from bench.errors import SpecError
from bench.registry import TASKS, include
from bench.rewards import REWARDS

ROOT = Path(__file__).resolve().parents[3]
PLUGIN = ROOT / "examples" / "preference_rewards.py"
PROMPTS = ["a red fox in the snow", "a blue bird on a branch"]
VARIABLES = (
    "DIFFGRAD_HPSV2_CHECKPOINT",
    "DIFFGRAD_IMAGEREWARD_CHECKPOINT",
    "DIFFGRAD_IMAGEREWARD_MED_CONFIG",
    "DIFFGRAD_IMAGEREWARD_TOKENIZER",
)


@pytest.fixture(scope="module", autouse=True)
def cache(pipeline_cache):
    return pipeline_cache


@pytest.fixture(scope="module")
def plugin():
    include(PLUGIN)  # the registries are scoped to this test file (conftest)
    return next(m for name, m in sys.modules.items() if name.startswith("_bench_include_preference_rewards_"))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def _task(batch_prompts=PROMPTS):
    """What the rewards read of a set-up image task."""
    return SimpleNamespace(
        name="sd", device=torch.device("cpu"), network_dtype=torch.float32, prompt_list=list(batch_prompts)
    )


def test_including_the_file_registers_both_rewards_for_images(plugin):
    for name in ("hpsv2", "imagereward"):
        reward = REWARDS.get(name, "image")
        assert reward.domain == "image" and reward.check is not None and reward.description
        assert name in REWARDS.names("image")
        TASKS.create(f"sd[reward={name}]")  # the task's option accepts it
        with pytest.raises(SpecError, match="scores image samples, not vector ones"):
            TASKS.create(f"toy[reward={name}]")


@pytest.mark.parametrize(
    "reward,module,pip", [("hpsv2", "hpsv2", "hpsv2"), ("imagereward", "ImageReward", "image-reward")]
)
def test_without_its_package_the_reward_is_refused_in_one_line(
    plugin, reward, module, pip, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)  # not importable, installed or not
    code = main(
        [
            "run",
            "--include",
            str(PLUGIN),
            "--tasks",
            f"sd[reward={reward},batch=1]",
            "--estimators",
            "sdo",
            "--targets",
            "latent",
            "--steps",
            "2",
            "--iters",
            "0",
            "--memory",
            "off",
            "--no-progress",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"the {pip} package is not installed" in err and f"pip install {pip}" in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("rows.jsonl"))


# --- stand-ins for the packages ------------------------------------------------------------------
class FakeClip(torch.nn.Module):
    """Stands for open_clip's CLIP as hpsv2 builds it: `encode_image` (B, 3, S, S) -> (B, D),
    `encode_text` (n, 77) tokens -> (n, D), unnormalised, and `visual` with its image size and
    normalisation (S = 8 here, 224 for the real ViT-H-14)."""

    def __init__(self, size=8, width=6):
        super().__init__()
        self.visual = torch.nn.Linear(3 * size * size, width)
        self.visual.image_size = (size, size)
        self.visual.image_mean = (0.48145466, 0.4578275, 0.40821073)
        self.visual.image_std = (0.26862954, 0.26130258, 0.27577711)
        self.token_embedding = torch.nn.Embedding(128, width)

    def encode_image(self, pixels):
        return self.visual(pixels.flatten(1))

    def encode_text(self, tokens):
        return self.token_embedding(tokens).mean(1)


def fake_tokenize(texts, context_length=77):
    """Stands for open_clip's tokenize: texts -> (n, 77) token ids."""
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [ord(c) % 128 for c in text][:context_length]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def fake_hpsv2(built):
    """hpsv2, hpsv2.src and hpsv2.src.open_clip: create_model_and_transforms (asserting that no
    pretrained tag, a download, is asked for) and get_tokenizer."""

    def create_model_and_transforms(name, pretrained=None, **kwargs):
        assert name == "ViT-H-14" and pretrained is None, (name, pretrained)
        built.append(FakeClip())
        return built[-1], None, None

    def get_tokenizer(name):
        assert name == "ViT-H-14"
        return fake_tokenize

    open_clip = types.ModuleType("hpsv2.src.open_clip")
    open_clip.create_model_and_transforms = create_model_and_transforms
    open_clip.get_tokenizer = get_tokenizer
    return {
        "hpsv2": types.ModuleType("hpsv2"),
        "hpsv2.src": types.ModuleType("hpsv2.src"),
        "hpsv2.src.open_clip": open_clip,
    }


class FakeTextEncoder(torch.nn.Module):
    """Stands for BLIP's BERT text encoder cross-attending to the image: (input_ids, attention_mask,
    encoder_hidden_states, encoder_attention_mask) -> last_hidden_state (B, L, H), here the masked
    mean of the token embeddings plus a projection of the mean image token, at every position; it
    records what it was called with."""

    def __init__(self, vocab, hidden, width):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.image = torch.nn.Linear(width, hidden)
        self.calls = []

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        self.calls.append((input_ids, attention_mask, encoder_attention_mask))
        mask = attention_mask[..., None].to(encoder_hidden_states.dtype)
        text = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        state = text + self.image(encoder_hidden_states.mean(1))
        return SimpleNamespace(last_hidden_state=state[:, None, :].expand(-1, input_ids.shape[1], -1))


class FakeImageReward(torch.nn.Module):
    """Stands for ImageReward.ImageReward.ImageReward(med_config, device): `blip` (its
    visual_encoder, 32-pixel patches -> (B, 49, W) tokens for 224-pixel images; text_encoder; the
    tokenizer, built as BLIP's init_tokenizer does, from BertTokenizer.from_pretrained
    ("bert-base-uncased")), the `mlp` head and the `mean` and `std` it normalises with."""

    def __init__(self, med_config, device="cpu"):
        super().__init__()
        from transformers import BertTokenizer

        hidden = json.loads(Path(med_config).read_text())["hidden_size"]
        self.blip = torch.nn.Module()
        self.blip.visual_encoder = torch.nn.Sequential(
            torch.nn.Conv2d(3, 5, kernel_size=32, stride=32), torch.nn.Flatten(2), _Transpose()
        )
        self.blip.tokenizer = BertTokenizer.from_pretrained("bert-base-uncased")
        self.blip.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.blip.text_encoder = FakeTextEncoder(len(self.blip.tokenizer), hidden, 5)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, 4), torch.nn.Linear(4, 1))
        self.mean, self.std = 0.25, 2.0


class _Transpose(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def fake_imagereward():
    """ImageReward and ImageReward.ImageReward (the submodule whose class the plug-in builds)."""
    inner = types.ModuleType("ImageReward.ImageReward")
    inner.ImageReward = FakeImageReward
    return {"ImageReward": types.ModuleType("ImageReward"), "ImageReward.ImageReward": inner}


def _bert_folder(folder: Path) -> Path:
    """A tiny local BERT tokenizer (a vocab.txt of the prompts' words), standing for bert-base-uncased."""
    from transformers import BertTokenizer

    folder.mkdir()
    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(folder)  # read from the vocab, as a real folder is
    return folder


# --- the wiring ----------------------------------------------------------------------------------
def test_hpsv2_is_the_cosine_of_each_image_and_its_own_prompt(plugin, tmp_path, monkeypatch):
    built = []
    for name, module in fake_hpsv2(built).items():
        monkeypatch.setitem(sys.modules, name, module)
    task = _task()
    with pytest.raises(SpecError, match="set DIFFGRAD_HPSV2_CHECKPOINT to the path of the HPSv2 checkpoint"):
        REWARDS.preflight("hpsv2", task, "image")
    torch.manual_seed(1)
    trained = FakeClip()
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "hps.pt")
    monkeypatch.setenv("DIFFGRAD_HPSV2_CHECKPOINT", str(tmp_path / "hps.pt"))
    REWARDS.preflight("hpsv2", task, "image")

    reward = REWARDS.build("hpsv2", task, "image")
    images = torch.rand(3, 3, 8, 8, requires_grad=True)  # at the model's size: no resize
    scores = reward(images)
    assert scores.shape == (3,)
    mean = torch.tensor(trained.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(trained.visual.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        image = F.normalize(trained.encode_image((images - mean) / std), dim=-1)
        text = F.normalize(trained.encode_text(fake_tokenize(PROMPTS)), dim=-1)
    expected = (image @ text.T)[torch.arange(3), torch.tensor([0, 1, 0])]  # the diagonal, prompts cycled
    torch.testing.assert_close(scores, expected)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    wide = reward(torch.rand(2, 3, 12, 20))  # the longer side to 8, zero-padded to a square
    assert wide.shape == (2,) and torch.isfinite(wide).all()
    torch.testing.assert_close(
        reward.to(torch.float64)(images.detach().double()), expected.double(), rtol=1e-4, atol=1e-5
    )


def test_imagereward_normalises_the_mlp_score_of_each_image_and_its_own_prompt(plugin, tmp_path, monkeypatch):
    for name, module in fake_imagereward().items():
        monkeypatch.setitem(sys.modules, name, module)
    task = _task()
    with pytest.raises(
        SpecError, match="set DIFFGRAD_IMAGEREWARD_CHECKPOINT to the path of the ImageReward checkpoint"
    ):
        REWARDS.preflight("imagereward", task, "image")
    checkpoint = tmp_path / "ImageReward.pt"
    monkeypatch.setenv("DIFFGRAD_IMAGEREWARD_CHECKPOINT", str(checkpoint))
    with pytest.raises(SpecError, match="is not a file"):
        REWARDS.preflight("imagereward", task, "image")
    bert = _bert_folder(tmp_path / "bert")
    (tmp_path / "med_config.json").write_text(json.dumps({"hidden_size": 7}))  # found beside the checkpoint
    torch.manual_seed(2)
    with plugin.bert_tokenizer_from(bert):
        trained = FakeImageReward(tmp_path / "med_config.json")
    torch.save(trained.state_dict(), checkpoint)
    monkeypatch.setenv("DIFFGRAD_IMAGEREWARD_TOKENIZER", str(tmp_path))
    with pytest.raises(SpecError, match="holds no vocab.txt"):
        REWARDS.preflight("imagereward", task, "image")
    monkeypatch.setenv("DIFFGRAD_IMAGEREWARD_TOKENIZER", str(bert))
    REWARDS.preflight("imagereward", task, "image")

    from transformers import BertTokenizer

    before = BertTokenizer.__dict__.get("from_pretrained")
    reward = REWARDS.build("imagereward", task, "image")
    assert BertTokenizer.__dict__.get("from_pretrained") is before  # the redirect ends with the build
    assert len(reward.model.blip.tokenizer) == 16  # the local folder's 15 tokens and BLIP's [DEC], not a hub BERT
    images = torch.rand(3, 3, 224, 224, requires_grad=True)  # at BLIP's size: no resize
    scores = reward(images)
    assert scores.shape == (3,)
    order = torch.tensor([0, 1, 0])  # sample b was drawn for prompt b mod 2
    tokens = trained.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    with torch.no_grad():
        embeds = trained.blip.visual_encoder((images - mean) / std)
        state = trained.blip.text_encoder(
            tokens.input_ids[order],
            attention_mask=tokens.attention_mask[order],
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(3, 49, dtype=torch.long),
            return_dict=True,
        ).last_hidden_state[:, 0]
        raw = trained.mlp(state).squeeze(-1)
    torch.testing.assert_close(scores, (raw - 0.25) / 2.0)
    assert not torch.allclose(scores, raw)
    ids, mask, image_mask = reward.model.blip.text_encoder.calls[-1]
    assert torch.equal(ids, tokens.input_ids[order]) and torch.equal(mask, tokens.attention_mask[order])
    assert ids.shape == (3, 35) and [
        reward.model.blip.tokenizer.decode(row, skip_special_tokens=True) for row in ids
    ] == [
        PROMPTS[0],
        PROMPTS[1],
        PROMPTS[0],
    ]
    assert image_mask.dtype == torch.long and image_mask.shape == (3, 49) and bool((image_mask == 1).all())
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    other = reward(torch.rand(2, 3, 64, 48))  # the shorter side to 224, centre-cropped
    assert other.shape == (2,) and torch.isfinite(other).all()
    torch.testing.assert_close(
        reward.to(torch.float64)(images.detach().double()), scores.detach().double(), rtol=1e-4, atol=1e-5
    )
