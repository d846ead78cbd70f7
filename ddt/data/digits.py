"""scikit-learn's handwritten digits (1,797 images, 10 classes) as small RGB images.

The 8×8 grey images (values 0–16, ink high) ship inside scikit-learn, so the quickstart runs
offline on real data. They are upscaled bilinearly and replicated to three channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 10


def load_digits(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as uint8 images (N, 3, S, S) and int64 labels (N,)."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.tensor(data.target, dtype=torch.int64)

