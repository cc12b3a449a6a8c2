"""Image-quality metrics of digits samples, computed outside any timed part.

- digits-FID: torchmetrics' FrechetInceptionDistance with the digits classifier's penultimate
  features (64-d) in place of Inception: comparable across runs of this suite, not with
  Inception FIDs in papers.
- digits-KID: the unbiased estimator of the squared MMD between the same features under KID's
  cubic polynomial kernel (Binkowski et al. 2018), over all samples at once: unbiased at any
  sample size, where an 8-sample FID is mostly the noise of an 8-sample covariance.
- accuracy: the classifier's accuracy on samples for a class; diversity: mean pairwise distance
  of sample features.
- clean-fid's (Inception) FID where its Inception weights are present locally; otherwise None and
  a reason (nothing is downloaded).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from tasks.digits.classifier import DigitClassifier, FeatureExtractor

CLEANFID_WEIGHTS = Path(tempfile.gettempdir()) / "inception-2015-12-05.pt"  # where clean-fid looks


def digits_fid(classifier: DigitClassifier, samples: Tensor, reals: Tensor) -> float:
    metric = FrechetInceptionDistance(feature=FeatureExtractor(classifier).float(), normalize=True)
    metric.update(reals.float(), real=True)
    metric.update(samples.float().clamp(-1, 1), real=False)
    return float(metric.compute())


@torch.no_grad()
def digits_kid(classifier: DigitClassifier, samples: Tensor, reals: Tensor) -> float:
    """MMD²_u between classifier features, kernel k(x, y) = (x·y / d + 1)³ (torchmetrics' KID
    with one subset holding every sample computes the same number)."""
    x = classifier.features(samples.float().clamp(-1, 1)).double()
    y = classifier.features(reals.float()).double()
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    d = x.shape[1]

    def mean_off_diagonal(k: Tensor) -> Tensor:
        n = k.shape[0]
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    return float(mean_off_diagonal(kxx) + mean_off_diagonal(kyy) - 2 * kxy.mean())


@torch.no_grad()
def class_accuracy(classifier: DigitClassifier, samples: Tensor, digit: int) -> float:
    return float((classifier(samples.float()).argmax(-1) == digit).float().mean())


@torch.no_grad()
def diversity(classifier: DigitClassifier, samples: Tensor) -> float:
    features = classifier.features(samples.float())
    if len(features) < 2:
        return float("nan")
    distances = torch.cdist(features, features)
    n = len(features)
    return float(distances.sum() / (n * (n - 1)))


def clean_fid(samples: Tensor, reals: Tensor, weights: Path = CLEANFID_WEIGHTS) -> tuple[float | None, str]:
    """(FID, "") with clean-fid's Inception features, or (None, why not) without downloading."""
    if not weights.exists():
        return None, f"clean-fid skipped: Inception weights not found at {weights}"
    from PIL import Image
    from cleanfid import fid

    with tempfile.TemporaryDirectory() as tmp:
        for name, images in (("fake", samples), ("real", reals)):
            folder = Path(tmp) / name
            folder.mkdir()
            pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte()[:, 0].numpy()
            for index, image in enumerate(pixels):
                Image.fromarray(image, mode="L").convert("RGB").save(folder / f"{index}.png")
        value = fid.compute_fid(
            str(Path(tmp) / "fake"),
            str(Path(tmp) / "real"),
            mode="clean",
            device=torch.device("cpu"),
            num_workers=0,
            verbose=False,
        )
    return float(value), ""
