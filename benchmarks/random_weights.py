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


def save_random_inception(path: Path) -> Path:
    """torch-fidelity's Inception-v3 architecture with random weights (the real ones cannot be fetched)."""
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
    torch.save(model.state_dict(), path)
    return path
