"""The reward registry (bench/rewards.py): every task serves the rewards of its domain, built-in,
registered by a plug-in module, named in the entry-point group, or given as module:function /
file.py:function; unknown names are refused with the task's valid ones; what a task resolves is
in its cells' keys."""

import importlib.metadata
import sys

import pytest
import torch

from bench.errors import SpecError
from bench.run.identity import code_modules
from bench.registry import TASKS
from bench.rewards import REWARD_GROUP, REWARDS

DOMAINS = {"toy": "vector", "digits": "digits-image", "sd": "image"}
BUILT_INS = {
    "vector": ["region", "distance", "inside"],
    "digits-image": ["classify", "audit", "ink", "symmetry", "decision"],
    "image": ["clip", "aesthetic", "lpips", "jpeg", "jpeg-incompressibility", "pickscore"],
}


def key_modules(task) -> set[str]:
    return set(code_modules(type(task), *task.code_objects()))


def test_every_registered_reward_is_listed_with_its_domain():
    listed = REWARDS.listing()
    by_domain: dict[str, list[str]] = {}
    for reward in listed:
        assert reward.description and reward.domain, reward
        by_domain.setdefault(reward.domain, []).append(reward.name)
    for domain, names in BUILT_INS.items():
        assert by_domain[domain][: len(names)] == names
    for task, domain in DOMAINS.items():  # each task's default reward is one of its domain's
        default = next(opt.default for opt in TASKS.get(task).options if opt.name == "reward")
        assert default in REWARDS.names(domain)


def nearest_origin(x):
    return -(x**2).sum(-1)


def test_a_reward_registered_for_the_toys_domain_is_usable_on_the_toy_and_keyed():
    with REWARDS.scoped():
        REWARDS.register(
            "near-origin", domain="vector", description="-|x|^2 (a test's)", factory=lambda task: nearest_origin
        )
        task = TASKS.create("toy[reward=near-origin,batch=4]")
        task.preflight()
        task.setup(torch.device("cpu"))
        problem = task.make_problem("latent", 2, 0)
        x = torch.randn(4, 2, dtype=torch.float64)
        assert torch.equal(problem.reward_fn(x), nearest_origin(x))
        assert __name__ in key_modules(task)
        assert __name__ not in key_modules(TASKS.create("toy"))
        with pytest.raises(SpecError, match="scores vector samples, not digits-image ones"):
            TASKS.create("digits[reward=near-origin]")
    with pytest.raises(SpecError, match="is unknown"):  # gone after the block
        TASKS.create("toy[reward=near-origin]")


@pytest.mark.parametrize(
    "task,wrong,close",
    [("toy", "regoin", "region"), ("digits", "clasify", "classify"), ("sd", "aesthetics", "aesthetic")],
)
def test_an_unknown_reward_is_refused_with_the_tasks_valid_names(task, wrong, close):
    with pytest.raises(SpecError) as error:
        TASKS.create(f"{task}[reward={wrong}]")
    message = str(error.value)
    assert "\n" not in message and f"did you mean {close!r}?" in message
    assert f"must be one of {', '.join(BUILT_INS[DOMAINS[task]])}, or module:function" in message
    others = {name for domain, names in BUILT_INS.items() if domain != DOMAINS[task] for name in names}
    assert not any(f" {name}," in message for name in others)


def test_a_reward_of_another_domain_is_refused_with_its_domain():
    with pytest.raises(SpecError, match="reward='classify' scores digits-image samples, not vector ones"):
        TASKS.create("toy[reward=classify]")


def test_the_same_file_reward_works_on_the_toy_and_on_digits(tmp_path):
    file = tmp_path / "my_score.py"
    file.write_text("def score(samples):\n    return -(samples**2).flatten(1).sum(-1)\n")
    for spec, shape in (("toy[batch=2", (2, 2)), ("digits[batch=2", (2, 1, 8, 8))):
        task = TASKS.create(f"{spec},reward={file}:score]")
        task.preflight()
        task.setup(torch.device("cpu"))
        problem = task.make_problem("latent", 2, 0)
        x = torch.rand(shape, dtype=problem.x_start.dtype)
        assert torch.equal(problem.reward_fn(x), -(x**2).flatten(1).sum(-1))
        assert any(name.startswith("_bench_reward_my_score_") for name in key_modules(task)), spec


def test_a_missing_reward_file_is_refused_before_anything_runs(tmp_path):
    task = TASKS.create(f"toy[reward={tmp_path}/nowhere.py:f]")
    with pytest.raises(SpecError, match="no such file"):
        task.preflight()


def test_entry_point_rewards_serve_the_tasks_of_their_declared_domain(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "from bench.rewards import scores\n"
        "@scores('vector')\n"
        "def spread(x):\n    return x.std(-1)\n"
        "def brightness(images):\n    return images.mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [
        importlib.metadata.EntryPoint(name="spread", value="myrewards:spread", group=REWARD_GROUP),
        importlib.metadata.EntryPoint(name="bright", value="myrewards:brightness", group=REWARD_GROUP),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: points if group == REWARD_GROUP else [])
    try:
        with REWARDS.scoped():
            REWARDS._plugins = None  # read the group again
            assert REWARDS.names("vector")[-1] == "spread" and REWARDS.names("image")[-1] == "bright"
            task = TASKS.create("toy[reward=spread,batch=3]")
            task.preflight()
            task.setup(torch.device("cpu"))
            x = torch.randn(3, 2, dtype=torch.float64)
            assert torch.equal(task.make_problem("latent", 2, 0).reward_fn(x), x.std(-1))
            assert "myrewards" in key_modules(task)
            TASKS.create("sd[reward=bright]")  # a function declaring no domain: an image reward, as before
            with pytest.raises(SpecError, match="reward='spread' scores vector samples, not image ones"):
                TASKS.create("sd[reward=spread]")
    finally:
        sys.modules.pop("myrewards", None)
