"""The latent codec: SD-VAE (diffusers `AutoencoderKL`) between uint8 images and scaled latents.

As in the official DDT code, a latent is a sample of the VAE posterior times the VAE's
`scaling_factor` (0.18215 for SD-VAE-ft-EMA), and decoding divides by it first. The latent cache
stores the posterior's mean and std (unscaled) so that training draws a fresh sample each time.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ddt.distributed import rank_rows
from ddt.images import to_model_range, to_uint8

SD_VAE = "stabilityai/sd-vae-ft-ema"


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float,
                     generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """A scaled latent (mean + std·ε)·scaling_factor, ε drawn from `generator` (this rank's rows)."""
    noise = rank_rows(torch.randn, tuple(mean.shape), generator, shard, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scaling_factor


class LatentCodec(nn.Module):
    """A frozen AutoencoderKL: uint8 images <-> posterior moments <-> scaled latents."""

    def __init__(self, vae: nn.Module, name: str = ""):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.name = name
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "LatentCodec":
        """Load a hub name (e.g. stabilityai/sd-vae-ft-ema) or a local `save_pretrained` folder."""
        from diffusers import AutoencoderKL

        local = Path(name_or_path).expanduser()
        looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
        if looks_local and not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"resolution.vae={name_or_path} is not a diffusers AutoencoderKL folder (no config.json). "
                f"On a machine with internet run: python -c \"from diffusers import AutoencoderKL; "
                f"AutoencoderKL.from_pretrained('{SD_VAE}').save_pretrained('{local}')\"")
        try:
            vae = AutoencoderKL.from_pretrained(str(local) if looks_local else name_or_path, low_cpu_mem_usage=False)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"cannot load the VAE resolution.vae={name_or_path} ({err}). Without internet, save it on a "
                f"machine with access (AutoencoderKL.from_pretrained('{SD_VAE}').save_pretrained(DIR)) and "
                f"pass resolution.vae=DIR") from err
        return cls(vae, name=name_or_path)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std (unscaled) of uint8 NCHW images."""
        dist = self.vae.encode(to_model_range(images)).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
               shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """A scaled latent (mean + std·ε)·scaling_factor, ε drawn from `generator`."""
        return sample_posterior(mean, std, self.scaling_factor, generator, shard)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator,
               shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Scaled latents of uint8 NCHW images (one posterior sample each)."""
        return self.sample(*self.moments(images), generator, shard)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int = 32) -> torch.Tensor:
        """uint8 NCHW images of scaled latents (decoded in chunks: the decoder's activations are large)."""
        return torch.cat([to_uint8(self.vae.decode(chunk / self.scaling_factor).sample)
                          for chunk in latents.split(chunk_size)])
