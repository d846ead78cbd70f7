"""A small CNN trained on the digits data: the feature extractor for digits FID/IS.

Inception-v3 features mean little on 16×16 handwritten digits; as is standard for MNIST-like
data, FID is computed on the penultimate features of a classifier trained on the real images, and
IS on its logits. A metric is only comparable while its feature extractor is fixed, so the trained
weights ship in `ddt/assets/` under a version name with their SHA-256 beside them
(`digits_classifier-v1.pt`, `digits_classifier-v1.sha256`), as Inception's weights are pinned. Runs
only read them; retraining is the explicit command

    python -m ddt.models.digits_classifier --version v2     # writes a new version, never overwrites

and results.json records the SHA-256 of the file that scored a run.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED_VERSION = "v1"  # the version eval.digits_classifier defaults to


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


def weights_path(version: str) -> Path:
    """The shipped weights file of a classifier version."""
    return ASSETS / f"digits_classifier-{version}.pt"


_HASHES: dict[tuple, str] = {}  # by (path, size, mtime): a 10 GB reference npz is read once per process


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (remembered while its size and mtime stay the same)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def shipped_weights(version: str = SHIPPED_VERSION) -> tuple[Path, str]:
    """(path, sha256) of a shipped classifier version, after checking the file against its recorded hash."""
    path, digest_file = weights_path(version), weights_path(version).with_suffix(".sha256")
    if not path.is_file() or not digest_file.is_file():
        known = sorted(p.stem.removeprefix("digits_classifier-") for p in ASSETS.glob("digits_classifier-*.pt"))
        raise FileNotFoundError(f"eval.digits_classifier={version}: {path} (and its .sha256) is not in the "
                                f"repository; shipped versions: {known}. Create a new one with "
                                f"`python -m ddt.models.digits_classifier --version {version}`")
    expected, actual = digest_file.read_text().split()[0], file_sha256(path)
    if actual != expected:
        raise ValueError(f"{path} has SHA-256 {actual} but {digest_file.name} records {expected}: the file was "
                         f"changed or damaged; restore it from git (git checkout -- {path.name})")
    return path, actual


def write_version(version: str, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> tuple[Path, str, float]:
    """Train a classifier and ship it as a new version (refuses to replace one); returns path, sha256, accuracy."""
    from ddt.checkpoint import atomic_save, atomic_write_bytes

    path = weights_path(version)
    if path.exists():
        raise FileExistsError(f"{path} exists: versions are never overwritten (results record their hash); "
                              f"choose another --version")
    model, accuracy = train_digits_classifier(images, labels, seed=seed)
    config = {"num_classes": model.logits.out_features, "feature_dim": model.features.out_features}
    atomic_save({"config": config, "state_dict": model.state_dict(), "test_accuracy": accuracy,
                 "seed": seed, "version": version}, path)
    digest = file_sha256(path)
    atomic_write_bytes(path.with_suffix(".sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    return path, digest, accuracy


def main() -> None:
    """Command line: train and ship a new classifier version."""
    parser = argparse.ArgumentParser(description="Train the digits FID/IS feature extractor and ship it as a "
                                                 "new version in ddt/assets/ (select it with eval.digits_classifier).")
    parser.add_argument("--version", required=True, help="new version name, e.g. v2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=16)
    args = parser.parse_args()
    from ddt.data.digits import load_digits  # only the command needs the data

    path, digest, accuracy = write_version(args.version, *load_digits(args.image_size), seed=args.seed)
    print(f"wrote {path} (held-out accuracy {accuracy:.4f}, sha256 {digest}); use eval.digits_classifier={args.version}")


if __name__ == "__main__":
    main()
