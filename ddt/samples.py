"""Sample writing: class-balanced labels and per-image noise, the sampler run over a folder of PNGs
(resumable: images already there are skipped), and the PNGs read back as an ADM-layout npz (arr_0 uint8
NHWC images, arr_1 labels, the layout of openai/guided-diffusion's `evaluations/evaluator.py` sample
batches) or tiled into a grid.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ddt.batches import PngFolder
from ddt.checkpoint import atomic_write_bytes
from ddt.errors import UsageError
from ddt.images import to_uint8
from ddt.progress import progress as progress_bar
from ddt.sampling import SamplingStats, sample


def sample_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: image i has class i mod num_classes."""
    return torch.arange(num_samples) % num_classes


# Added to an image's seed for its SDE step noise: on CPU both streams would otherwise be one Mersenne
# Twister stream, and image i's step noise would repeat the initial noise of image i or of a neighbour.
STEP_NOISE_STREAM = 1 << 62


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s noise under the run's seed."""
    return seed * 1_000_003 + int(index)


def sample_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-image noise from (seed, image index): independent of batch size, rank and resumption."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in indices])


def step_noise_generators(indices: torch.Tensor, seed: int, device: torch.device) -> list[torch.Generator]:
    """One SDE step-noise generator per image, seeded from (seed, image index): independent of the batch split."""
    return [torch.Generator(device).manual_seed(STEP_NOISE_STREAM + image_seed(seed, i)) for i in indices]


# What counts as an image of a samples folder: any of these next to the run's own would be scored by a
# scorer reading the folder (torch-fidelity, ADM's npz tools) and mistaken for the run's.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def sample_name(index: int) -> str:
    """The file name of sample `index` (000000.png ...)."""
    return f"{index:06d}.png"


def refuse_other_images(samples_dir: str | Path, num_samples: int) -> None:
    """Stop, in one line, when samples_dir holds an image that is not one of the run's num_samples samples."""
    samples_dir, mine = Path(samples_dir), {sample_name(i) for i in range(num_samples)}
    if not samples_dir.is_dir():
        return
    others = sorted(p.name for p in samples_dir.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in mine)
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UsageError(f"samples folder {samples_dir} holds {len(others)} image(s) besides the {num_samples} the run "
                         f"writes ({sample_name(0)} to {sample_name(num_samples - 1)}): {listed}; move them out of "
                         f"{samples_dir} (or move the folder away to sample afresh) and run the same command again")


def sample_paths(samples_dir: str | Path, num_samples: int) -> list[Path]:
    """The paths of the run's num_samples samples; fails naming the first missing one or any other image."""
    samples_dir = Path(samples_dir)
    refuse_other_images(samples_dir, num_samples)
    paths = [samples_dir / sample_name(i) for i in range(num_samples)]
    for i, path in enumerate(paths):
        if not path.exists():
            raise FileNotFoundError(f"sample {path} is missing ({i} of eval.num_samples={num_samples} "
                                    f"found); run the sample stage first (stage=[sample,evaluate])")
    return paths


class RunSamples(PngFolder):
    """Exactly the num_samples images a run wrote into samples_dir, in sample order, as uint8 CHW images."""

    def __init__(self, samples_dir: str | Path, num_samples: int):  # not PngFolder's glob: its own list
        self.paths = sample_paths(samples_dir, num_samples)


def write_png(image: np.ndarray, path: Path) -> None:
    """Write an HWC uint8 image as PNG through a temp file and rename."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))


def generate_samples(model: nn.Module, samples_dir: str | Path, *, num_samples: int, batch_size: int,
                     seed: int, sampler_kwargs: dict, latent_shape: tuple[int, ...],
                     decode: Callable[[torch.Tensor], torch.Tensor] = to_uint8,
                     rank: int = 0, world_size: int = 1, progress: bool = True,
                     stop: Callable[[], bool] | None = None) -> dict:
    """Write samples_dir/{i:06d}.png for this rank's i < num_samples (i ≡ rank mod world_size),
    skipping images already there; returns early (`stopped`) once `stop()` is true after a batch."""
    samples_dir = Path(samples_dir)
    refuse_other_images(samples_dir, num_samples)  # before any sampling: they would be scored as the run's
    samples_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    labels = sample_labels(num_samples, model.num_classes)
    mine = range(rank, num_samples, world_size)
    todo = [i for i in mine if not (samples_dir / sample_name(i)).exists()]
    stats = SamplingStats()
    start, done, stopped = time.perf_counter(), 0, False
    bar = progress_bar(len(mine), "sample", "img", initial=len(mine) - len(todo), enabled=progress)
    for first in range(0, len(todo), batch_size):
        if stop is not None and stop():
            stopped = True  # e.g. a preemption signal: the images written so far are kept for the rerun
            break
        batch = torch.tensor(todo[first:first + batch_size], dtype=torch.long)
        noise = sample_noise(batch, latent_shape, seed).to(device)
        generators = step_noise_generators(batch, seed, device)
        images = decode(sample(model, noise, labels[batch].to(device), generator=generators, stats=stats,
                               **sampler_kwargs))
        for i, image in zip(batch.tolist(), images.permute(0, 2, 3, 1).cpu().numpy()):
            write_png(image, samples_dir / sample_name(i))
        bar.update(len(batch))
        done += len(batch)
    bar.close()
    seconds = time.perf_counter() - start
    return {"num_samples": num_samples, "generated": done, "stopped": stopped, "wall_time_s": round(seconds, 3),
            "images_per_s": round(done / seconds, 3) if done else None,
            "nfe_per_image": stats.evaluations / done if done else None,  # a guided evaluation counts once
            "encoder_passes_per_image": stats.encoder_passes / done if done else None,
            "decoder_passes_per_image": stats.decoder_passes / done if done else None}


def read_samples(samples_dir: str | Path, num_samples: int) -> np.ndarray:
    """The run's num_samples PNGs as a uint8 NHWC array; fails naming the first missing file or any other image."""
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in sample_paths(samples_dir, num_samples)])


def write_npz(images: np.ndarray, labels: np.ndarray, path: str | Path) -> None:
    """ADM evaluation-suite layout: arr_0 uint8 NHWC images, arr_1 labels."""
    def write(f):
        np.savez(f, arr_0=images, arr_1=labels)
    atomic_write_bytes(path, write)


def image_grid(images: np.ndarray, nrow: int = 10, min_tile: int = 64) -> np.ndarray:
    """Up to nrow² images (NHWC uint8) tiled into one image, upscaled so that small images stay visible."""
    images = images[: nrow * nrow]
    n, h, w, c = images.shape
    scale = max(1, min_tile // h)
    rows = -(-n // nrow)
    pad = 2
    grid = np.zeros((rows * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad, c), np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, nrow)
        tile = image.repeat(scale, 0).repeat(scale, 1)
        y0, x0 = pad + r * (h * scale + pad), pad + col * (w * scale + pad)
        grid[y0:y0 + h * scale, x0:x0 + w * scale] = tile
    return grid


def write_grid(images: np.ndarray, path: str | Path, nrow: int = 10, min_tile: int = 64) -> None:
    """Save up to nrow² images (NHWC uint8) as one PNG grid."""
    write_png(image_grid(images, nrow, min_tile), Path(path))
