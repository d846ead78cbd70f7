"""Pixel ranges: uint8 [0, 255] images and the model's float [-1, 1] (pixel models and the VAE)."""
from __future__ import annotations

import torch


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageTensors(torch.utils.data.Dataset):
    """In-memory uint8 images and labels; indexing with a tensor of indices gives a batch dict."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: torch.Tensor | int) -> dict[str, torch.Tensor]:
        return {"images": self.images[idx], "labels": self.labels[idx]}
