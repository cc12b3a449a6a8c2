"""The digits task's rewards of x_0 in [-1, 1], (B, 1, 8, 8): `digits[reward=NAME]`. Those that
ask for the class `digit` carry the trait NAMES_A_CLASS, so that FID and KID compare samples with
the held-out digits of that class."""

from __future__ import annotations

import torch

from bench.rewards import REWARDS

DIGITS = REWARDS.domain("digits-image", "images", "(B, 1, 8, 8) images in [-1, 1]")
NAMES_A_CLASS = "names-a-class"  # the reward asks for the class `digit`


def _log_probability(task, judge_in):
    """log p(digit | x) under the classifier that judge_in(dtype) gives."""
    return lambda x: torch.log_softmax(judge_in(x.dtype)(x), dim=-1)[:, task.digit]


def _classify(task):
    return _log_probability(task, task.classifier_in)


def _audit(task):
    return _log_probability(task, task.audit_in)


def _audit_check(task):
    task.audit_file()  # a SpecError naming the file and the command that trains it


def _decision(task):  # a thresholded decision: zero gradient almost everywhere
    return lambda x: (task.classifier_in(x.dtype)(x).argmax(dim=-1) == task.digit).to(x.dtype)


def _ink(task):
    return lambda x: ((x + 1) / 2).mean(dim=(1, 2, 3))


def _symmetry(task):
    return lambda x: -((x - x.flip(-1)) ** 2).mean(dim=(1, 2, 3))


REWARDS.register(
    "classify",
    domain=DIGITS,
    description="log p(digit | x) under the trained digits classifier",
    factory=_classify,
    traits=(NAMES_A_CLASS,),
)
REWARDS.register(
    "audit",
    domain=DIGITS,
    description="log p(digit | x) under a second classifier (a pixel MLP, another seed): a held-out judge",
    factory=_audit,
    traits=(NAMES_A_CLASS,),
    check=_audit_check,
)
REWARDS.register("ink", domain=DIGITS, description="mean brightness (DDPO's brightness analogue)", factory=_ink)
REWARDS.register("symmetry", domain=DIGITS, description="-(left-right mirror error)", factory=_symmetry)
REWARDS.register(
    "decision",
    domain=DIGITS,
    description="1 if the classifier's top class is digit, else 0 (not differentiable)",
    factory=_decision,
    traits=(NAMES_A_CLASS,),
)
