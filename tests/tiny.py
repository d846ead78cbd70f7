"""Small randomly initialised stand-ins for the pretrained components, saved the way the real ones ship.

The real SD-VAE, DINOv2 and Inception weights cannot be downloaded here; the tests save tiny models
with the same classes and formats and load them through the suite's real loading code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.random_weights import save_random_inception, save_tiny_vae  # noqa: F401 (shared with benchmarks)

TINY_DINOV2 = dict(embed_dim=32, depth=2, num_heads=2)  # timm vit_*_patch14_dinov2 overrides


def save_tiny_dinov2(path: Path, **architecture) -> Path:
    """A 2-block, width-32 ViT with DINOv2's architecture (timm; `architecture` overrides TINY_DINOV2), saved as
    a safetensors state dict."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518,
                              **{**TINY_DINOV2, **architecture})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def save_image_folder(root: Path, classes: int = 3, per_class: int = 6, corrupt: bool = True) -> Path:
    """A small ImageNet-style folder root/<class>/<image> of smooth random images, one of them corrupt."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(40, 90, size=2)
            low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            image = Image.fromarray(low).resize((int(w), int(h)), Image.BICUBIC)
            image.save(root / f"n{c:08d}" / f"img_{i}.JPEG", quality=95)
    if corrupt:
        (root / "n00000000" / "broken.JPEG").write_bytes(b"not a jpeg")
    return root
