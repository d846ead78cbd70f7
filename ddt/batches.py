"""Image batches and reference files: sources of uint8 images (a tensor, a Dataset, a folder of PNGs,
or the arr_0 of an ADM-layout npz streamed from its file, its header parsed without loading it) as
batches in order, and the checks and stored statistics (mu/sigma, mu_s/sigma_s) of an ADM reference
batch, the npz files of openai/guided-diffusion's `evaluations/evaluator.py`.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

STAT_PAIRS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}  # what an ADM reference batch stores


class UInt8Images(torch.utils.data.Dataset):
    """A uint8 (N, 3, H, W) tensor as a Dataset of CHW images."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class PngFolder(torch.utils.data.Dataset):
    """The *.png files of a folder in name order (sample order for 000000.png, ...) as uint8 CHW images."""

    def __init__(self, root: str | Path):
        self.paths = sorted(Path(root).glob("*.png"))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        # np.array, not np.asarray: PIL hands numpy its pixels as read-only bytes, which torch would share
        # (and warn about); the copy is one image.
        return torch.from_numpy(np.array(Image.open(self.paths[i]).convert("RGB"))).permute(2, 0, 1)


def npz_header(path: str | Path, name: str = "arr_0") -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of array `name` in an npz, read from its header only; None when it has no such array."""
    with zipfile.ZipFile(path) as archive:
        if f"{name}.npy" not in archive.namelist():
            return None
        with archive.open(f"{name}.npy") as f:
            shape, _, dtype = npy_header(f)
    return tuple(shape), dtype


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an open .npy stream, leaving it at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}; save the batch with numpy's np.savez")


def npz_batches(path: str | Path, batch_size: int) -> Iterator[torch.Tensor]:
    """arr_0 (uint8 NHWC) of an npz as uint8 NCHW batches, streamed from the file (a 50K×512² batch is 39 GB)."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        shape, fortran, dtype = npy_header(f)
        if fortran:
            raise ValueError(f"{path}: arr_0 is stored in Fortran order; save it with np.savez from a C-order array")
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        for first in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - first)
            data = f.read(count * per_image)
            if len(data) != count * per_image:
                raise ValueError(f"{path}: arr_0 ends after {first} of {shape[0]} images; the file is truncated")
            yield torch.from_numpy(np.frombuffer(data, dtype).reshape(count, *shape[1:]).copy()).permute(0, 3, 1, 2)


def as_dataset(images: torch.Tensor | torch.utils.data.Dataset | str | Path) -> torch.utils.data.Dataset:
    """A Dataset of uint8 CHW images from a uint8 NCHW tensor, a Dataset or a folder of PNGs."""
    if isinstance(images, torch.Tensor):
        return UInt8Images(images)
    if isinstance(images, (str, Path)):
        return PngFolder(images)
    return images


def count_images(images) -> int:
    """How many images a source of images (see image_batches) holds."""
    if isinstance(images, (str, Path)) and Path(images).suffix == ".npz":
        return npz_header(images)[0][0]
    return len(as_dataset(images))


def image_batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """uint8 NCHW batches, in order, of a tensor, a Dataset, a folder of PNGs or an npz's arr_0."""
    if isinstance(images, (str, Path)) and Path(images).suffix == ".npz":
        return npz_batches(images, batch_size)
    dataset = as_dataset(images)
    # Worker processes pay off for large decoded sets only (an ImageNet folder), not for a few batches.
    decoded = not isinstance(dataset, UInt8Images) and len(dataset) > 8 * batch_size
    workers = min(8, os.cpu_count() or 1) if decoded else 0
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def check_reference_npz(path: str | Path) -> Path:
    """Fail unless path is an ADM-style reference batch with mu and sigma or images (arr_0), read from headers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference batch {path} does not exist. Download it from the ADM suite "
            f"(https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
            f"{'512' if '512' in path.name else '256'}/{path.name}) and put it there or pass "
            f"eval.reference_npz=PATH")
    with np.load(path) as npz:
        missing = {"mu", "sigma"} - set(npz.files)
        if missing and "arr_0" not in npz.files:
            raise ValueError(f"reference batch {path} has no {sorted(missing)} (arrays: {npz.files}) and no images "
                             f"(arr_0) to compute them from; it must hold an ADM-style mu/sigma of Inception pool "
                             f"features or the reference images")
    return path


def read_reference_stats(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The statistics an ADM reference batch stores: {"fid": (mu, sigma), "sfid": (mu_s, sigma_s)} where present."""
    with np.load(check_reference_npz(path)) as npz:
        return {metric: (npz[mu], npz[sigma]) for metric, (mu, sigma) in STAT_PAIRS.items()
                if {mu, sigma} <= set(npz.files)}
