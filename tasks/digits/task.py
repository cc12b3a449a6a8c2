"""digits: latent, conditioning and weight optimisation through a trained class-conditional U-Net.

The sampler is conditioned on class `cls` (its learned embedding, with classifier-free guidance
`guidance`); the default reward, `classify`, is the log-probability of class `digit` under the
trained classifier, so every target has something to gain: move the initial latent (SDO's
"control generation"), the embedding (AdjointDPM's embedding inversion), or the network
(DRaFT/AlignProp reward fine-tuning, LoRA adapters through peft, or all weights with tune=full).
Other rewards: `ink` (mean brightness, the analogue of DDPO's brightness/compressibility rewards)
and `symmetry` (negative left-right mirror error). `model=flow` swaps in a rectified-flow U-Net
(velocity prediction, same data and architecture) sampled by flow-matching Euler, and
`model=transformer` a rectified-flow SD3 MMDiT (tasks/digits/model.py); `sampler` picks any
sampler the model can drive (ddim or dpmpp2m for the epsilon model)."""

from __future__ import annotations

import copy
import functools
import math

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from torch import Tensor

from bench.capabilities import FEW_STEP_CHAIN
from bench.chain import Chain
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import TARGETS, Problem
from bench.rewards import REWARDS
from tasks.base import Task, sampler_option
from bench import gating
from tasks.digits import data, metrics, paths, rewards, shortcut
from bench.gating import GATES
from tasks.digits.classifier import AuditClassifier, DigitClassifier
from tasks.digits.model import (
    FLOW_SCHEDULER_CONFIG,
    NULL_CLASS,
    SCHEDULER_CONFIG,
    TOKENS,
    WIDTH,
    ClassTransformer,
    GuidedDenoiser,
)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
# The transformer's: both streams' attention projections, as SD3 LoRA trainers adapt them.
TRANSFORMER_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _digit(value: int) -> str | None:
    return None if 0 <= value <= 9 else "must be a digit 0..9"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


AUDIT_REWARD = "audit"  # the reward that reads paths.AUDIT


class Digits(Task):
    name = "digits"
    summary = "class-conditional U-Net trained on sklearn digits; classifier rewards; digits-FID"
    version = "1"
    dtype = torch.float32
    options = (
        REWARDS.option(
            rewards.DIGITS,
            "classify",
            "a reward of the images (python -m bench list): classify, log p(digit | x); audit, the "
            "same under a second classifier; ink, mean brightness; symmetry, -(left-right mirror "
            "error); decision, 1 if the classifier's top class is `digit`, else 0 (not "
            "differentiable); or module:function / file.py:function",
        ),
        Option(
            "held_out",
            str,
            "",
            "a second reward evaluated on the optimised sampler's samples (eval_held_out) and never "
            "optimised, e.g. audit beside classify: reward hacking shows as a gap; empty: none",
            check=lambda value: None if value == "" else REWARDS.refusal(value, rewards.DIGITS),
        ),
        Option("digit", int, 7, "the class the classify and audit rewards ask for", check=_digit),
        Option("cls", int, 1, "the class the sampler is conditioned on", check=_digit),
        Option("batch", int, 8, "samples per problem", check=at_least(1)),
        Option("guidance", float, 2.0, "classifier-free guidance scale (1: none)", check=_positive),
        Option("eta", float, 0.0, "DDIM eta, or flow-sde's noise level (0: deterministic)", check=at_least(0.0)),
        Option(
            "tune", str, "lora", "weights target: LoRA adapters (peft) or all U-Net weights", choices=("lora", "full")
        ),
        Option("lora_rank", int, 4, "LoRA rank", check=at_least(1)),
        Option("fid_samples", int, 64, "samples drawn for FID after optimising cond or weights", check=at_least(2)),
        Option("models", str, "", "folder of trained models (default: shipped, else cache, else train)"),
        Option(
            "model",
            str,
            "epsilon",
            "epsilon: the DDPM noise-prediction U-Net; flow: the "
            "rectified-flow velocity U-Net (same architecture and data); transformer: a rectified-flow "
            "SD3 MMDiT (same data)",
            choices=tuple(paths.MODELS),
        ),
        sampler_option(),
        *gating.gate_options(),
    )
    targets = (*TARGETS, GATES)

    train_timesteps = SCHEDULER_CONFIG["num_train_timesteps"]

    def _folder(self) -> paths.Path | None:
        return paths.locate(self.model) if not self.models else paths.Path(self.models).expanduser()

    @property
    def model_prediction(self) -> str:
        return "epsilon" if self.model == "epsilon" else "flow"

    def scheduler_config(self) -> dict:
        return dict(SCHEDULER_CONFIG if self.model == "epsilon" else FLOW_SCHEDULER_CONFIG)

    def preflight(self) -> None:
        super().preflight()
        REWARDS.preflight(self.reward, self, rewards.DIGITS)
        if self.held_out:
            if self.held_out == self.reward:
                raise SpecError(
                    f"digits[held_out={self.held_out}]: the held-out reward is the optimised one; "
                    "name another (e.g. audit beside classify) or omit held_out"
                )
            REWARDS.preflight(self.held_out, self, rewards.DIGITS)
        if self.models and not paths.complete(self._folder(), self.model):
            raise SpecError(
                f"digits[models={self.models}]: not a folder of digits models (needs "
                f"{', '.join(paths.files(self.model))}); omit models= for the shipped ones"
            )

    def data_fingerprint(self) -> str:
        folder = self._folder()
        if folder is None or not paths.complete(folder, self.model):
            return "untrained"
        fingerprint = paths.fingerprint(folder, self.model)
        if AUDIT_REWARD in (self.reward, self.held_out) and (folder / paths.AUDIT).exists():
            fingerprint += "+" + paths.file_fingerprint(folder / paths.AUDIT)  # only where it is read
        return fingerprint

    def audit_file(self, train_missing: bool = False) -> paths.Path:
        """The audit classifier's weights (in the cache, trained there when missing and asked to),
        or a SpecError that says how to make them."""
        folder = self._folder() or paths.cache_dir()
        path = folder / paths.AUDIT
        if not path.exists():
            if folder != paths.cache_dir():
                raise SpecError(
                    f"digits: the audit reward needs {path} (python -m tasks.digits.train --what audit --out {folder})"
                )
            if train_missing:
                from tasks.digits import train

                train.train_all(folder, "audit")
        return path

    @property
    def learning_rates(self) -> dict[str, float]:
        return {
            "latent": 0.05,
            "cond": 0.05,
            "noise": 0.05,
            "weights": 3e-3 if self.tune == "lora" else 1e-4,
            GATES: 0.1,
        }

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        diffusers_logging.set_verbosity_error()  # casting a copy to float64 is deliberate here
        folder = self._folder()
        if folder is None:
            folder = self._train_and_cache(self.model)
        if not paths.complete(folder, self.model):
            raise SpecError(f"digits[models={self.models}]: missing {', '.join(paths.files(self.model))} there")
        weights = paths.model_dir(folder, self.model)
        if self.model == "transformer":  # read as the U-Net is: `unet` names the denoising network
            network = SD3Transformer2DModel.from_pretrained(weights / "transformer", local_files_only=True)
            self.unet = ClassTransformer(network).eval()
        else:
            self.unet = UNet2DConditionModel.from_pretrained(weights / "unet", local_files_only=True).eval()
        self.unet.requires_grad_(False)
        self.embeddings = load_file(weights / "embedding.safetensors")["table"].view(-1, TOKENS, WIDTH)
        self.classifier = DigitClassifier()
        self.classifier.load_state_dict(load_file(folder / "classifier.safetensors"))
        self.classifier.eval().requires_grad_(False)
        self.held_out_images, self.held_out_labels = data.split("held_out")
        self._audit: AuditClassifier | None = None  # loaded where a reward reads it
        self._judges: dict[tuple[str, torch.dtype], torch.nn.Module] = {}  # the classifiers, per dtype
        self._flops: dict[str, float] | None = None
        self._static_results: dict[tuple, dict[str, float]] = {}  # the gates' static baselines, per N
        self._reward = REWARDS.build(self.reward, self, rewards.DIGITS)
        self._held_out = REWARDS.build(self.held_out, self, rewards.DIGITS) if self.held_out else None

    @staticmethod
    def _train_and_cache(model: str):
        from tasks.digits import train

        folder = paths.cache_dir()
        if not (folder / "classifier.safetensors").exists():
            train.train_all(folder, "classifier")
        if not (folder / paths.AUDIT).exists():
            train.train_all(folder, "audit")
        train.train_all(folder, "unet" if model == "epsilon" else model)
        return folder

    def classifier_in(self, dtype: torch.dtype) -> DigitClassifier:
        return self._judge_in("classifier", self.classifier, dtype)

    def audit_in(self, dtype: torch.dtype) -> AuditClassifier:
        if self._audit is None:
            self._audit = AuditClassifier()
            self._audit.load_state_dict(load_file(self.audit_file(train_missing=True)))
            self._audit.eval().requires_grad_(False)
        return self._judge_in("audit", self._audit, dtype)

    def _judge_in(self, name: str, network: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        """A copy of a frozen classifier on the task's device in `dtype`, made once."""
        if (name, dtype) not in self._judges:
            self._judges[name, dtype] = copy.deepcopy(network).to(device=self.device, dtype=dtype)
        return self._judges[name, dtype]

    def reward_of(self, x: Tensor) -> Tensor:
        """Per-sample reward of x_0 in [-1, 1], shape (B, 1, 8, 8): the `reward` option's, from the registry."""
        return self._reward(x)

    def code_objects(self) -> tuple:
        """The sampler and the rewards, resolved by name: their code is in the cells' keys."""
        held_out = REWARDS.code_objects(self.held_out, rewards.DIGITS) if self.held_out else ()
        return super().code_objects() + REWARDS.code_objects(self.reward, rewards.DIGITS) + held_out

    def denoiser(self, target: str, dtype: torch.dtype, seed: int) -> GuidedDenoiser:
        unet = copy.deepcopy(self.unet).to(device=self.device, dtype=dtype)
        if target == "weights":
            if self.tune == "lora":
                from peft import LoraConfig

                with torch.random.fork_rng(devices=[]):  # the same adapters in every copy of a problem
                    torch.manual_seed(seed)
                    unet.add_adapter(
                        LoraConfig(
                            r=self.lora_rank,
                            lora_alpha=self.lora_rank,
                            init_lora_weights="gaussian",
                            target_modules=TRANSFORMER_LORA_TARGETS if self.model == "transformer" else LORA_TARGETS,
                        )
                    )
            else:
                unet.requires_grad_(True)
        null = self.embeddings[NULL_CLASS].to(device=self.device, dtype=dtype)
        return GuidedDenoiser(unet, null, self.guidance)

    def make_problem(self, target: str, steps: int, seed: int, dtype: torch.dtype | None = None) -> Problem:
        self.check_target(target)
        dtype = dtype or self.dtype
        if target == GATES:
            return self._gate_problem(steps, seed, dtype)
        denoiser = self.denoiser(target, dtype, seed)
        generator = torch.Generator().manual_seed(seed)
        x_start = torch.randn(self.batch, 1, 8, 8, generator=generator).to(device=self.device, dtype=dtype)
        noises = None
        if self.eta > 0:
            noises = [
                torch.randn(self.batch, 1, 8, 8, generator=generator).to(device=self.device, dtype=dtype)
                for _ in range(steps)
            ]
        cond = self.embeddings[self.cls].clone().to(device=self.device, dtype=dtype)
        leaves = self.leaves_for(target, x_start, cond, noises, denoiser)
        schedule = self.make_schedule(steps)
        problem = Problem(
            chain=Chain(denoiser, schedule),
            x_start=x_start,
            cond=cond,
            noises=noises,
            reward_fn=self.reward_of,
            target=target,
            leaves=leaves,
        )
        if self._student_applies():
            problem.extras[FEW_STEP_CHAIN] = functools.cache(lambda k: shortcut.student_chain(self, problem, k))
        return problem

    @property
    def gated_path(self) -> tuple[str, ...]:
        """Where the gated network sits in the problem's denoiser: the U-Net, or the transformer
        inside ClassTransformer."""
        return ("unet", "transformer") if self.model == "transformer" else ("unet",)

    def _gate_problem(self, steps: int, seed: int, dtype: torch.dtype) -> Problem:
        """DiP-GO's search (bench/gating.py) on the frozen U-Net's five blocks or the transformer's
        six: gate logits per (step, block), the consistency reward and the sparsity penalty."""
        self.check_point(GATES, steps)
        problem = self.make_problem("latent", steps, seed, dtype)
        return gating.search(self, problem, self.gated_path, seed, self.block_flops())

    def block_flops(self) -> dict[str, float]:
        """Operations of each gated block and of the rest of one guided call (batch 2: the null
        and conditional halves), counted once on an all-open call."""
        if self._flops is None:
            cond, x = self.embeddings[self.cls].expand(2, -1, -1), torch.zeros(2, 1, 8, 8)
            network = functools.reduce(getattr, self.gated_path, self)
            with torch.no_grad():
                self._flops = gating.block_flops(network, lambda: self.unet(x, torch.full((2,), 500.0), cond))
        return self._flops

    def offers(self) -> dict[str, object]:
        """shortcut-model's distilled students: the step counts shipped for the model."""
        return {FEW_STEP_CHAIN: shortcut.offered_steps(self._folder(), self.model)}

    def check_point(self, target: str, steps: int) -> None:
        if target == GATES and steps < 2:
            raise SpecError(
                f"target 'gates' needs N >= 2 steps, got {steps}: step N computes every block, so "
                "at N = 1 there is nothing to gate"
            )

    def _student_applies(self) -> bool:
        """The shipped students follow the deterministic DDIM chain of the epsilon model at their
        guidance, the transformer's the chain of the options it was distilled at (tasks/digits/shortcut.py)."""
        return shortcut.applies(self)

    def images(self, problem: Problem, x0: Tensor) -> Tensor:
        return ((x0.detach().float() + 1) / 2).clamp(0, 1)

    def _reference_class(self, target: str | None) -> int | None:
        """The class samples should show: the conditioning class for the gates target (the pruned
        sampler should draw what the unpruned one draws), the reward's class for classify and
        decision, else none (every class)."""
        if target == GATES:
            return self.cls
        return self.digit if rewards.NAMES_A_CLASS in REWARDS.traits(self.reward, rewards.DIGITS) else None

    def _reference_images(self, target: str | None = None) -> Tensor:
        """What FID and KID compare samples with: the held-out digits of `_reference_class`, or
        every held-out digit."""
        cls = self._reference_class(target)
        return self.held_out_images if cls is None else self.held_out_images[self.held_out_labels == cls]

    def quality_reference(self, target: str | None = None) -> str:
        cls = self._reference_class(target)
        which = "every class" if cls is None else f"class {cls}"
        return f"held-out digits of {which} ({len(self._reference_images(target))} images)"

    @torch.no_grad()
    def quality_floor(self, target: str | None = None) -> dict[str, float]:
        """FID and KID between two halves of the reference images: what a perfect sampler would
        score at that sample size (FID is biased upward at small sizes; KID is not)."""
        reals = self._reference_images(target)
        order = torch.randperm(len(reals), generator=torch.Generator().manual_seed(0))
        half = len(reals) // 2
        first, second = reals[order[:half]], reals[order[half : 2 * half]]
        classifier = self.classifier_in(torch.float32)
        return {
            "fid": metrics.digits_fid(classifier, first, second),
            "kid": metrics.digits_kid(classifier, first, second),
        }

    @torch.no_grad()
    def evaluate(self, problem: Problem, x0: Tensor) -> dict[str, float]:
        """Reward (and the held-out reward) of the problem's own samples; FID, KID, accuracy,
        diversity and both rewards again (`reward_fresh`, `held_out_fresh`) on fresh samples where
        the optimised quantity allows drawing more (cond, weights), else on the batch itself
        (latent, noise). FID and KID compare with `_reference_images`."""
        if problem.target == GATES:
            return self._evaluate_gates(problem, x0)
        values = self.reward_of(x0)
        samples = x0
        judged = {"reward": float(values.mean())}
        if self._held_out is not None:  # the second judge, on the same samples as the reward
            judged["held_out"] = float(self._held_out(x0).mean())
        if problem.target in ("cond", "weights"):
            fresh, noises = self._fresh(problem, x0)
            samples = problem.chain.sample(fresh, problem.cond, noises)
            judged["reward_fresh"] = float(self.reward_of(samples).mean())
            if self._held_out is not None:
                judged["held_out_fresh"] = float(self._held_out(samples).mean())
        classifier = self.classifier_in(torch.float32)
        reals = self._reference_images().to(self.device)
        result = {
            **judged,
            "fid": metrics.digits_fid(classifier, samples, reals),
            "kid": metrics.digits_kid(classifier, samples, reals),
            "fid_samples": float(len(samples)),
            "accuracy": metrics.class_accuracy(classifier, samples, self.digit),
            "diversity": metrics.diversity(classifier, samples),
        }
        value, _ = metrics.clean_fid(samples, reals)  # None without local Inception weights
        if value is not None:
            result["clean_fid"] = value
        return {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))}

    def _fresh(self, problem: Problem, like: Tensor) -> tuple[Tensor, list[Tensor] | None]:
        """fid_samples fresh initial latents (and injected noises), the same for every evaluation."""
        generator = torch.Generator().manual_seed(10_000)
        fresh = torch.randn(self.fid_samples, 1, 8, 8, generator=generator).to(like)
        noises = (
            None
            if problem.noises is None
            else [torch.randn(fresh.shape, generator=generator).to(like) for _ in problem.noises]
        )
        return fresh, noises

    @torch.no_grad()
    def _evaluate_gates(self, problem: Problem, x0: Tensor) -> dict[str, float]:
        """The searched gates deployed (closed blocks skipped) on fid_samples fresh samples: speed-up
        over the unpruned sampler (wall-clock, operations, block calls) and quality (accuracy for the
        conditioning class, digits-FID, distance to the unpruned samples); the static baselines
        (gating.static_patterns) beside, measured once per step count."""
        fresh, noises = self._fresh(problem, x0)
        classifier = self.classifier_in(torch.float32)
        reals = self._reference_images(GATES).to(self.device)

        def quality(samples: Tensor, unpruned: Tensor) -> dict[str, float]:
            return {
                "accuracy": metrics.class_accuracy(classifier, samples, self.cls),
                "fid": metrics.digits_fid(classifier, samples, reals),
                "consistency_mse": float(((samples - unpruned) ** 2).mean()),
            }

        # the baselines do not depend on the gate options: measured once per task for the rest
        key = (
            self.data_fingerprint(),
            *sorted((k, v) for k, v in self.values.items() if not k.startswith("gate_")),
            problem.num_steps,
            str(x0.dtype),
        )
        deployed = gating.evaluate_search(
            problem,
            self._static_results,
            key,
            chain=problem.chain,
            path=self.gated_path,
            network=gating.ungated(problem, self.gated_path),
            fresh=fresh,
            cond=problem.cond,
            noises=noises,
            quality=quality,
            device=self.device,
            threads=torch.get_num_threads(),
        )
        return {"reward": float(problem.reward_fn(x0).mean()), **deployed}
