"""A small CNN trained on the digits data: the feature extractor for digits FID/IS.

Inception-v3 features mean little on 16×16 handwritten digits; as is standard for MNIST-like
data, FID is computed on the penultimate features of a classifier trained on the real images, and
IS on its logits. It is trained once (seeded, a fixed split) and cached by the evaluation code.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsClassifier(nn.Module):
    """uint8 images (B, 3, 16, 16) -> (features (B, feature_dim), logits (B, num_classes))."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),   # 8×8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),   # 4×4
        )
        self.features = nn.Linear(64 * 4 * 4, feature_dim)
        self.logits = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 127.5 - 1.0
        if x.shape[-1] != 16:
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        features = F.relu(self.features(self.conv(x).flatten(1)))
        return features, self.logits(features)


def train_digits_classifier(images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                            epochs: int = 20, test_fraction: float = 0.2) -> tuple[DigitsClassifier, float]:
    """Train on a seeded split of uint8 images; returns the model and its held-out accuracy."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=generator)
    num_test = int(len(images) * test_fraction)
    test, train = perm[:num_test], perm[num_test:]
    model = DigitsClassifier(num_classes=int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train), generator=generator).split(64):
            batch = images[train[idx]]
            # One-pixel random shifts so that the features do not hinge on exact positions.
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(batch)[1], labels[train[idx]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test])[1].argmax(1) == labels[test]).float().mean().item()
    return model, accuracy
