"""digits: latent, conditioning and weight optimisation through a trained class-conditional U-Net.

The sampler is conditioned on class `cls` (its learned embedding, with classifier-free guidance
`guidance`); the default reward, `classify`, is the log-probability of class `digit` under the
trained classifier, so every target has something to gain: move the initial latent (SDO's
"control generation"), the embedding (AdjointDPM's embedding inversion), or the network
(DRaFT/AlignProp reward fine-tuning, LoRA adapters through peft, or all weights with tune=full).
Other rewards: `ink` (mean brightness, the analogue of DDPO's brightness/compressibility rewards)
and `symmetry` (negative left-right mirror error). `model=flow` swaps in a rectified-flow U-Net
(velocity prediction, same data and architecture) sampled by flow-matching Euler; `sampler`
picks any sampler the model can drive (ddim or dpmpp2m for the epsilon model)."""
from __future__ import annotations

import copy
import math

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from torch import Tensor

from bench.chain import Chain
from bench.errors import SpecError
from bench.options import Option, at_least
from bench.problem import Problem
from tasks.base import Task, sampler_option
from tasks.digits import data, metrics, paths, shortcut
from tasks.digits.classifier import DigitClassifier
from tasks.digits.model import (FLOW_SCHEDULER_CONFIG, NULL_CLASS, SCHEDULER_CONFIG, TOKENS, WIDTH,
                                 GuidedDenoiser)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def _digit(value: int) -> str | None:
    return None if 0 <= value <= 9 else "must be a digit 0..9"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


class Digits(Task):
    name = "digits"
    summary = "class-conditional U-Net trained on sklearn digits; classifier rewards; digits-FID"
    version = "1"
    dtype = torch.float32
    options = (
        Option("reward", str, "classify", "classify: log p(digit | x); ink: mean brightness; "
               "symmetry: -(left-right mirror error); decision: 1 if the classifier's top class is "
               "`digit`, else 0 (not differentiable)", choices=("classify", "ink", "symmetry", "decision")),
        Option("digit", int, 7, "the class the classify reward asks for", check=_digit),
        Option("cls", int, 1, "the class the sampler is conditioned on", check=_digit),
        Option("batch", int, 8, "samples per problem", check=at_least(1)),
        Option("guidance", float, 2.0, "classifier-free guidance scale (1: none)", check=_positive),
        Option("eta", float, 0.0, "DDIM eta (0: deterministic)", check=at_least(0.0)),
        Option("tune", str, "lora", "weights target: LoRA adapters (peft) or all U-Net weights",
               choices=("lora", "full")),
        Option("lora_rank", int, 4, "LoRA rank", check=at_least(1)),
        Option("fid_samples", int, 64, "samples drawn for FID after optimising cond or weights",
               check=at_least(2)),
        Option("models", str, "", "folder of trained models (default: shipped, else cache, else train)"),
        Option("model", str, "epsilon", "epsilon: the DDPM noise-prediction U-Net; flow: the "
               "rectified-flow velocity U-Net (same architecture and data)", choices=("epsilon", "flow")),
        sampler_option(),
    )

    train_timesteps = SCHEDULER_CONFIG["num_train_timesteps"]

    def _folder(self) -> paths.Path | None:
        return paths.locate(self.model) if not self.models else paths.Path(self.models).expanduser()

    @property
    def model_prediction(self) -> str:
        return self.model

    def scheduler_config(self) -> dict:
        return dict(FLOW_SCHEDULER_CONFIG if self.model == "flow" else SCHEDULER_CONFIG)

    def preflight(self) -> None:
        super().preflight()
        if self.models and not paths.complete(self._folder(), self.model):
            raise SpecError(f"digits[models={self.models}]: not a folder of digits models (needs "
                            f"{', '.join(paths.files(self.model))}); omit models= for the shipped ones")

    def data_fingerprint(self) -> str:
        folder = self._folder()
        return paths.fingerprint(folder, self.model) if folder is not None and paths.complete(folder, self.model) \
            else "untrained"

    @property
    def learning_rates(self) -> dict[str, float]:
        return {"latent": 0.05, "cond": 0.05, "noise": 0.05, "weights": 3e-3 if self.tune == "lora" else 1e-4}

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        diffusers_logging.set_verbosity_error()  # casting a copy to float64 is deliberate here
        folder = self._folder()
        if folder is None:
            folder = self._train_and_cache(self.model)
        if not paths.complete(folder, self.model):
            raise SpecError(f"digits[models={self.models}]: missing {', '.join(paths.files(self.model))} there")
        weights = paths.model_dir(folder, self.model)
        self.unet = UNet2DConditionModel.from_pretrained(weights / "unet", local_files_only=True).eval()
        self.unet.requires_grad_(False)
        self.embeddings = load_file(weights / "embedding.safetensors")["table"].view(-1, TOKENS, WIDTH)
        self.classifier = DigitClassifier()
        self.classifier.load_state_dict(load_file(folder / "classifier.safetensors"))
        self.classifier.eval().requires_grad_(False)
        self.held_out, self.held_out_labels = data.split("held_out")
        self._classifiers: dict[torch.dtype, DigitClassifier] = {}

    @staticmethod
    def _train_and_cache(model: str):
        from tasks.digits import train

        train.train_all(paths.cache_dir(), "all" if model == "epsilon" else "flow")
        return paths.cache_dir()

    def classifier_in(self, dtype: torch.dtype) -> DigitClassifier:
        if dtype not in self._classifiers:
            self._classifiers[dtype] = copy.deepcopy(self.classifier).to(device=self.device, dtype=dtype)
        return self._classifiers[dtype]

    def reward_of(self, x: Tensor) -> Tensor:
        """Per-sample reward of x_0 in [-1, 1], shape (B, 1, 8, 8)."""
        if self.reward == "classify":
            return torch.log_softmax(self.classifier_in(x.dtype)(x), dim=-1)[:, self.digit]
        if self.reward == "decision":  # a thresholded decision: zero gradient almost everywhere
            return (self.classifier_in(x.dtype)(x).argmax(dim=-1) == self.digit).to(x.dtype)
        if self.reward == "ink":
            return ((x + 1) / 2).mean(dim=(1, 2, 3))
        return -((x - x.flip(-1)) ** 2).mean(dim=(1, 2, 3))

    def denoiser(self, target: str, dtype: torch.dtype, seed: int) -> GuidedDenoiser:
        unet = copy.deepcopy(self.unet).to(device=self.device, dtype=dtype)
        if target == "weights":
            if self.tune == "lora":
                from peft import LoraConfig

                with torch.random.fork_rng(devices=[]):  # the same adapters in every copy of a problem
                    torch.manual_seed(seed)
                    unet.add_adapter(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank,
                                                init_lora_weights="gaussian", target_modules=LORA_TARGETS))
            else:
                unet.requires_grad_(True)
        null = self.embeddings[NULL_CLASS].to(device=self.device, dtype=dtype)
        return GuidedDenoiser(unet, null, self.guidance)

    def make_problem(self, target: str, steps: int, seed: int,
                     dtype: torch.dtype | None = None) -> Problem:
        self.check_target(target)
        dtype = dtype or self.dtype
        denoiser = self.denoiser(target, dtype, seed)
        generator = torch.Generator().manual_seed(seed)
        x_start = torch.randn(self.batch, 1, 8, 8, generator=generator).to(device=self.device, dtype=dtype)
        noises = None
        if self.eta > 0:
            noises = [torch.randn(self.batch, 1, 8, 8, generator=generator).to(device=self.device, dtype=dtype)
                      for _ in range(steps)]
        cond = self.embeddings[self.cls].clone().to(device=self.device, dtype=dtype)
        leaves = self.leaves_for(target, x_start, cond, noises, denoiser)
        schedule = self.make_schedule(steps)
        problem = Problem(chain=Chain(denoiser, schedule), x_start=x_start, cond=cond, noises=noises,
                          reward_fn=self.reward_of, target=target, leaves=leaves)
        if self._student_applies():
            problem.shortcut = lambda k: shortcut.student_chain(self, problem, k)
        return problem

    def shortcut_steps(self) -> list[int]:
        return shortcut.shipped_steps(self._folder()) if self.model == "epsilon" else []

    def _student_applies(self) -> bool:
        """The shipped students follow the deterministic DDIM chain of the epsilon model at their
        guidance (tasks/digits/shortcut.py)."""
        return (self.model == "epsilon" and self.chosen_sampler().name == "ddim" and self.eta == 0
                and self.guidance == shortcut.GUIDANCE)

    def images(self, problem: Problem, x0: Tensor) -> Tensor:
        return ((x0.detach().float() + 1) / 2).clamp(0, 1)

    def _reference_images(self) -> Tensor:
        """What FID and KID compare samples with: the held-out digits of the class the reward asks
        for where it names one (classify, decision), else every held-out digit."""
        if self.reward in ("classify", "decision"):
            return self.held_out[self.held_out_labels == self.digit]
        return self.held_out

    def quality_reference(self) -> str:
        which = f"class {self.digit}" if self.reward in ("classify", "decision") else "every class"
        return f"held-out digits of {which} ({len(self._reference_images())} images)"

    @torch.no_grad()
    def quality_floor(self) -> dict[str, float]:
        """FID and KID between two halves of the reference images: what a perfect sampler would
        score at that sample size (FID is biased upward at small sizes; KID is not)."""
        reals = self._reference_images()
        order = torch.randperm(len(reals), generator=torch.Generator().manual_seed(0))
        half = len(reals) // 2
        first, second = reals[order[:half]], reals[order[half:2 * half]]
        classifier = self.classifier_in(torch.float32)
        return {"fid": metrics.digits_fid(classifier, first, second),
                "kid": metrics.digits_kid(classifier, first, second)}

    @torch.no_grad()
    def evaluate(self, problem: Problem, x0: Tensor) -> dict[str, float]:
        """Reward of the problem's own samples; FID, KID, accuracy and diversity on fresh samples
        where the optimised quantity allows drawing more (cond, weights), else on the batch itself
        (latent, noise). FID and KID compare with `_reference_images`."""
        rewards = self.reward_of(x0)
        samples = x0
        if problem.target in ("cond", "weights"):
            generator = torch.Generator().manual_seed(10_000)
            fresh = torch.randn(self.fid_samples, 1, 8, 8, generator=generator).to(x0)
            noises = None if problem.noises is None else [
                torch.randn(fresh.shape, generator=generator).to(x0) for _ in problem.noises]
            samples = problem.chain.sample(fresh, problem.cond, noises)
        classifier = self.classifier_in(torch.float32)
        reals = self._reference_images().to(self.device)
        result = {
            "reward": float(rewards.mean()),
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
