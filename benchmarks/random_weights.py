"""Real architectures with random weights, for speed measurements (and tests) where the pretrained
weights cannot be downloaded."""
from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_vae(path: Path) -> Path:
    """A 4-level (8x downsampling, like SD-VAE) AutoencoderKL of width 8, via save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32)
    vae.save_pretrained(path)
    return path


LOGIT_SPREAD = 3.0  # std over images of the random Inception's logits


def smooth_images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (N, 3, size, size): 4×4 random colours upsampled bicubically."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (count, 3, 4, 4), generator=g).float()
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp(0, 255).round().to(torch.uint8)


def spread_random_init(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Kaiming-initialise convs and fc, set every batch norm's running statistics from `images`, scale fc.

    `model` returns the 2048-d pool features (features_list ["2048"]).

    With the default init the features are ~1e-8 (IS about 1, precision/recall uninformative); this
    keeps each layer's output at unit scale, as trained weights do, so features and logits spread.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics of `images`
    model.train()
    with torch.no_grad():
        model(images)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    model.eval()
    with torch.no_grad():  # logits that vary by a few units across images, as a trained classifier's
        pool = model(images)[0]
        model.fc.weight.mul_(LOGIT_SPREAD / (pool @ model.fc.weight.T).std(0).mean())


def save_random_inception(path: Path) -> Path:
    """torch-fidelity's Inception-v3 architecture with random weights (the real ones cannot be fetched),
    seeded, with spread features (see spread_random_init)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)
    load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state_dict: None  # keep the random init
    try:
        torch.manual_seed(0)
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load
    spread_random_init(model, smooth_images(24))
    torch.save(model.state_dict(), path)
    return path
