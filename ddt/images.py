"""Pixel ranges: uint8 [0, 255] images and the model's float [-1, 1] (pixel models and the VAE).

Below both ddt.data and ddt.models (it imports only torch), so the VAE and the objective convert
pixels without importing the datasets.
"""
from __future__ import annotations

import torch


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
