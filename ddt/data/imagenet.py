"""ImageNet-style class folders (root/<class>/<image>) with the ADM/DiT centre crop.

The latent cache (`ddt.data.latents.cache_latents`) reads images through `ImageFolder`; REPA reads
the clean images again through the same `center_crop_arr`, so both see identical pixels. Run via
`python launch.py stage=cache_latents data=imagenet_latents data.root=PATH resolution=...`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What PIL raises on truncated, corrupt or unsupported files (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM/DiT centre crop of a PIL image to an (image_size, image_size, 3) uint8 array."""
    pil_image = pil_image.convert("RGB")
    # Halve with a box filter first, as ADM does, so the bicubic step never aliases large images.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """The centre-cropped uint8 CHW tensor of the image file at `path` (PIL errors propagate)."""
    with Image.open(path) as img:
        arr = center_crop_arr(img, image_size)
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()  # copy: PIL's array is read-only


def _image_files(class_dir: str) -> list[str]:
    """Paths (relative to class_dir's parent) of all image files below class_dir, unsorted."""
    found, stack = [], [class_dir]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(entry.path)
    return found


class ImageFolder(torch.utils.data.Dataset):
    """Images under root/<class>/ (recursively), labelled by the sorted position of their class."""

    def __init__(self, root: str | Path, image_size: int):
        self.root = str(root)
        self.image_size = int(image_size)
        layout = "expected root/<class>/<image> (e.g. ILSVRC/Data/CLS-LOC/train/n01440764/x.JPEG)"
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"data.root={self.root} is not a directory; {layout}. "
                                    f"Point data.root at the folder holding one sub-folder per class")
        with os.scandir(self.root) as entries:
            self.classes = sorted(e.name for e in entries if e.is_dir())
        files, labels = [], []
        for label, name in enumerate(self.classes):
            class_dir = os.path.join(self.root, name)
            found = sorted(os.path.relpath(p, self.root) for p in _image_files(class_dir))
            files.extend(found)
            labels.extend([label] * len(found))
        if not files:
            raise FileNotFoundError(
                f"data.root={self.root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                f"{len(self.classes)} class folders; {layout}")
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> str:
        """The path of image i: root joined with its relative path."""
        return os.path.join(self.root, self.files[i])

    def try_read(self, i: int) -> tuple[torch.Tensor | None, str]:
        """(cropped uint8 CHW tensor, "") or (None, why it could not be decoded)."""
        try:
            return load_image(self.path(i), self.image_size), ""
        except DECODE_ERRORS as err:
            return None, f"{type(err).__name__}: {err}"

    def read(self, i: int) -> torch.Tensor | None:
        """The cropped uint8 CHW tensor of image i, or None if it cannot be decoded (see try_read)."""
        return self.try_read(i)[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """(cropped uint8 CHW image, label) of image i; raises OSError naming the file if it cannot be decoded."""
        image, error = self.try_read(i)
        if image is None:
            raise OSError(f"cannot decode image {self.path(i)} (index {i}): {error}. Delete or replace "
                          f"the file; the latent cache skips such files")
        return image, int(self.labels[i])


def read_or_next(folder: ImageFolder, i: int) -> tuple[torch.Tensor, int]:
    """Image i and its label, or the next decodable one (deterministic, so resumed runs agree)."""
    for j in range(i, i + len(folder)):
        k = j % len(folder)
        image, error = folder.try_read(k)
        if image is not None:
            return image, int(folder.labels[k])
        log.warning("skipping undecodable image %s (%s)", folder.path(k), error)
    raise OSError(f"no image under data.root={folder.root} can be decoded")


class ImageFolderBatches(torch.utils.data.Dataset):
    """Batches {images, labels} of an ImageFolder for training on images (the VAE encodes on the fly).

    An undecodable file is replaced by the next decodable image; clean the folder, or use the latent
    cache, which skips and counts such files.
    """

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        images, labels = zip(*(read_or_next(self.folder, int(i)) for i in idx))
        return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.int64)}


class FolderImages(torch.utils.data.Dataset):
    """The uint8 CHW images of an ImageFolder alone (torch-fidelity's input for reference statistics)."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_or_next(self.folder, i)[0]
