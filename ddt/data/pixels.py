"""In-memory uint8 image datasets (the digits); the pixel-range conversions live in ddt.images."""
from __future__ import annotations

import torch


class ImageTensors(torch.utils.data.Dataset):
    """In-memory uint8 images and labels; indexing with a tensor of indices gives a batch dict."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: torch.Tensor | int) -> dict[str, torch.Tensor]:
        return {"images": self.images[idx], "labels": self.labels[idx]}
