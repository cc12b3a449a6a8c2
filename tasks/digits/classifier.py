"""A small CNN classifier of 8x8 digits: the `classify` reward (log-probability of a class) and
the feature extractor of the digits-FID (its penultimate layer, NUM_FEATURES wide). And a second
classifier of another kind (an MLP on the pixels, another seed), the `audit` reward: a judge that
optimising `classify` never sees, so that a sample which fools the first but not the second shows
as reward hacking."""

from __future__ import annotations

import torch
from torch import Tensor, nn

NUM_FEATURES = 64


class DigitClassifier(nn.Module):
    num_features = NUM_FEATURES  # torchmetrics' FID reads this from a custom feature extractor

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, NUM_FEATURES),
            nn.SiLU(),
        )
        self.head = nn.Linear(NUM_FEATURES, 10)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features of images in [-1, 1], shape (B, 1, 8, 8)."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits."""
        return self.head(self.features(images))


class AuditClassifier(nn.Module):
    """An MLP on the 64 pixels: no convolution, no pooling, so it does not share the CNN's blind spots."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 256),
            nn.SiLU(),
            nn.Dropout(0.2),
            nn.Linear(256, 128),
            nn.SiLU(),
            nn.Linear(128, 10),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Class logits of images in [-1, 1], shape (B, 1, 8, 8)."""
        return self.net(images)


class FeatureExtractor(nn.Module):
    """What torchmetrics' FrechetInceptionDistance calls: images -> (B, NUM_FEATURES)."""

    num_features = NUM_FEATURES

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images.float())


def jitter(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random shifts by up to one pixel (the only augmentation): robustness to generated strokes."""
    padded = nn.functional.pad(images, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


def train_classifier(
    images: Tensor, labels: Tensor, epochs: int = 40, seed: int = 0, progress=None, kind: type = DigitClassifier
) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = kind()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = (len(images) + 63) // 64
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            index = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(jitter(images[index], generator)), labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
        if progress is not None:
            progress()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    return float((model(images).argmax(-1) == labels).float().mean())
