"""The SD-VAE latent cache: posterior moments of every image, in resumable safetensors shards.

Build it with `python launch.py stage=cache_latents data=imagenet_latents data.root=PATH resolution=...`
(which calls `cache_latents`); SLURM array tasks or ranks run the same command with a different rank.
A cache folder holds

    meta.json                  VAE, image size, latent shape, shard size, dtype, classes
    files.txt                  the image path (relative to data.root) of each image index
    shard_00000.safetensors    mean, std (N, C, h, w), labels, index (N,); skipped images in metadata

Shard k covers image indices [k*shard_size, (k+1)*shard_size) and is written in one rename, so a
killed run leaves only complete shards and a rerun continues with the missing ones. Training reads
it through `LatentDataset`, which memory-maps the shards.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ddt.checkpoint import atomic_write_bytes, atomic_write_json
from ddt.data.imagenet import ImageFolder, load_image
from ddt.progress import progress as progress_bar

log = logging.getLogger(__name__)

FORMAT = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# meta.json keys that must agree for two runs to write into one folder ("root" may move).
MUST_MATCH = ("format", "vae", "scaling_factor", "image_size", "latent_shape", "num_images",
              "shard_size", "dtype", "classes")
CACHE_COMMAND = ("python launch.py stage=cache_latents data=imagenet_latents data.root=... "
                 "resolution=...")


class Encoder(Protocol):
    """What the cache needs of a codec (ddt.models.vae.LatentCodec is one); typed by its interface
    so that ddt.data never imports ddt.models."""

    name: str
    scaling_factor: float
    latent_channels: int
    downsample: int

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def to(self, device: str | torch.device) -> "Encoder": ...


def shard_path(out_dir: str | Path, k: int) -> Path:
    """The file of shard k."""
    return Path(out_dir) / f"shard_{k:05d}.safetensors"


def read_meta(out_dir: str | Path) -> dict:
    """The meta.json of a latent cache folder."""
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: data.latents_dir={out_dir} holds no latent cache. "
                                f"Build it with: {CACHE_COMMAND} data.latents_dir={out_dir}")
    return json.loads(path.read_text())


def _short(value) -> str:
    """A value for an error message; long lists (e.g. 1000 classes) are summarised."""
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} items: {value[0]!r}, ..., {value[-1]!r}]"
    return repr(value)


def _check_existing(out_dir: Path, meta: dict, files: list[str]) -> None:
    """Refuse to mix two different caches in one folder."""
    fix = f"use another data.latents_dir or delete {out_dir} to rebuild the cache"
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        for key in MUST_MATCH:
            if old.get(key) != meta[key]:
                raise ValueError(f"{meta_path} was written with {key}={_short(old.get(key))} but this run "
                                 f"has {key}={_short(meta[key])}; {fix}")
    files_path = out_dir / "files.txt"
    if files_path.is_file():
        old_files = files_path.read_text().splitlines()
        if old_files != files:
            differ = (i for i, (a, b) in enumerate(zip(old_files, files)) if a != b)
            at = next(differ, min(len(old_files), len(files)))
            raise ValueError(f"{files_path} differs from the images under data.root={meta['root']} at index "
                             f"{at} ({old_files[at:at + 1]} vs {files[at:at + 1]}); {fix}")


class _Decode(torch.utils.data.Dataset):
    """ImageFolder items as (index, image or None, error), so unreadable files reach the main process."""

    def __init__(self, images: ImageFolder):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        image, error = self.images.try_read(i)
        return i, image, error


def _keep(batch: list) -> list:
    """Collate function that keeps the list (a module-level function so workers can pickle it)."""
    return batch


def _remove_stale_temps(out_dir: Path, shards: list[int]) -> None:
    """Delete temp files a killed run of this rank left behind (atomic_write_bytes names them .NAME.*.tmp)."""
    for k in shards:
        for tmp in out_dir.glob(f".{shard_path(out_dir, k).name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def cache_latents(dataset: ImageFolder, codec: Encoder, out_dir: str | Path, *, shard_size: int = 1000,
                  batch_size: int = 64, rank: int = 0, world_size: int = 1, dtype: str = "float32",
                  device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True) -> dict:
    """Encode this rank's missing shards of `dataset` into `out_dir`; returns counts and throughput."""
    if dtype not in DTYPES:
        raise ValueError(f"latent cache dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
    if dataset.image_size % codec.downsample:
        raise ValueError(f"image size {dataset.image_size} is not a multiple of the VAE's downsampling "
                         f"factor {codec.downsample}; pick a resolution that is")
    out_dir = Path(out_dir)
    n = len(dataset)
    num_shards = math.ceil(n / shard_size)
    side = dataset.image_size // codec.downsample
    latent_shape = [codec.latent_channels, side, side]
    meta = dict(format=FORMAT, vae=codec.name, scaling_factor=codec.scaling_factor,
                image_size=dataset.image_size, latent_shape=latent_shape, num_images=n,
                num_shards=num_shards, shard_size=shard_size, dtype=dtype,
                root=os.path.abspath(dataset.root), classes=list(dataset.classes))
    _check_existing(out_dir, meta, dataset.files)
    # Every rank writes identical bytes, so concurrent renames are harmless.
    atomic_write_json(meta, out_dir / "meta.json")
    atomic_write_bytes(out_dir / "files.txt", lambda f: f.write("".join(p + "\n" for p in dataset.files).encode()))

    mine = list(range(rank, num_shards, world_size))
    todo = [k for k in mine if not shard_path(out_dir, k).is_file()]
    _remove_stale_temps(out_dir, todo)
    # Batches never straddle shards, so a shard's bytes do not depend on rank, world_size or resume.
    batches, batch_shard = [], []
    for k in todo:
        stop = min(n, (k + 1) * shard_size)
        for start in range(k * shard_size, stop, batch_size):
            batches.append(list(range(start, min(stop, start + batch_size))))
            batch_shard.append(k)
    batches_left = {k: batch_shard.count(k) for k in todo}

    codec = codec.to(device)  # in place: the caller's codec moves too (it is frozen, so that is harmless)
    torch_dtype = DTYPES[dtype]
    loader = torch.utils.data.DataLoader(_Decode(dataset), batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=_keep)
    bar = progress_bar(sum(len(b) for b in batches), f"latents rank {rank}/{world_size}", "img", enabled=progress)
    began = time.perf_counter()
    encoded = unreadable = 0
    parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "index": []}
    skipped: list[list] = []
    for k, batch in zip(batch_shard, loader):
        good = [(i, image) for i, image, _ in batch if image is not None]
        for i, image, error in batch:
            if image is None:
                log.warning("skipping unreadable image %s (index %d): %s", dataset.path(i), i, error)
                skipped.append([i, dataset.files[i], error])
        if good:
            images = torch.stack([image for _, image in good]).to(device)
            with torch.no_grad():
                mean, std = codec.moments(images)
            parts["mean"].append(mean.to("cpu", torch_dtype))
            parts["std"].append(std.to("cpu", torch_dtype))
            parts["index"].append(torch.tensor([i for i, _ in good], dtype=torch.int64))
        encoded += len(good)
        unreadable += len(batch) - len(good)
        bar.update(len(batch))
        batches_left[k] -= 1
        if batches_left[k] == 0:
            _write_shard(out_dir, k, parts, skipped, dataset.labels, latent_shape, torch_dtype)
            parts = {name: [] for name in parts}
            skipped = []
    bar.close()
    seconds = time.perf_counter() - began
    stats = dict(shards_total=num_shards, shards_rank=len(mine), shards_written=len(todo),
                 shards_existing=len(mine) - len(todo), images_encoded=encoded, images_unreadable=unreadable,
                 seconds=seconds, images_per_s=encoded / seconds if seconds > 0 else 0.0)
    log.info("latent cache %s rank %d/%d: %s", out_dir, rank, world_size, stats)
    return stats


def _write_shard(out_dir: Path, k: int, parts: dict, skipped: list, labels: torch.Tensor,
                 latent_shape: list[int], dtype: torch.dtype) -> None:
    """Write shard k in one rename."""
    if parts["index"]:
        index = torch.cat(parts["index"])
        mean, std = torch.cat(parts["mean"]), torch.cat(parts["std"])
    else:  # every image of the shard was unreadable: keep an empty shard so the cache is complete
        index = torch.empty(0, dtype=torch.int64)
        mean = std = torch.empty((0, *latent_shape), dtype=dtype)
    tensors = {"mean": mean.contiguous(), "std": std.contiguous(), "labels": labels[index].contiguous(),
               "index": index}
    # One metadata key only: safetensors writes metadata in hash-map order, which varies between runs.
    data = safetensors_bytes(tensors, {"skipped": json.dumps(skipped)})
    atomic_write_bytes(shard_path(out_dir, k), lambda f: f.write(data))


def _scan_shards(out_dir: Path, num_shards: int) -> tuple[list[int | None], int]:
    """Per shard its number of cached images (None if missing), and the total skipped; reads headers only."""
    lengths, skipped = [], 0
    for k in range(num_shards):
        path = shard_path(out_dir, k)
        if not path.is_file():
            lengths.append(None)
            continue
        with safe_open(str(path), "pt") as f:
            lengths.append(f.get_slice("index").get_shape()[0])
            skipped += len(json.loads((f.metadata() or {}).get("skipped", "[]")))
    return lengths, skipped


def latent_cache_status(out_dir: str | Path) -> dict:
    """How many of the expected shards exist, images cached and images skipped as unreadable."""
    meta = read_meta(out_dir)
    lengths, skipped = _scan_shards(Path(out_dir), meta["num_shards"])
    missing = [k for k, length in enumerate(lengths) if length is None]
    return dict(shards_total=meta["num_shards"], shards_present=meta["num_shards"] - len(missing),
                missing=missing, complete=not missing, images_cached=sum(x or 0 for x in lengths),
                images_unreadable=skipped)


class LatentDataset(torch.utils.data.Dataset):
    """A complete latent cache, read lazily from memory-mapped shards, indexed by whole batches."""

    def __init__(self, out_dir: str | Path, image_root: str | None = None):
        self.dir = Path(out_dir)
        meta = read_meta(self.dir)
        lengths, self.images_unreadable = _scan_shards(self.dir, meta["num_shards"])
        missing = [k for k, length in enumerate(lengths) if length is None]
        if missing:
            raise FileNotFoundError(
                f"latent cache data.latents_dir={self.dir} is incomplete: {len(lengths) - len(missing)} of "
                f"{len(lengths)} shards exist (missing e.g. {shard_path(self.dir, missing[0]).name}). Run the "
                f"cache stage to finish it (it resumes): {CACHE_COMMAND} data.latents_dir={self.dir}")
        self.meta = meta
        self.scaling_factor = float(meta["scaling_factor"])
        self.classes = list(meta["classes"])
        self.num_classes = len(self.classes)
        self.latent_shape = tuple(meta["latent_shape"])
        self.image_size = int(meta["image_size"])
        self.lengths = lengths
        # Global item j lives in shard searchsorted(offsets, j, right=True) - 1, row j - offsets[shard].
        self.offsets = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)
        self.image_root = image_root
        self.files = None
        if image_root is not None:
            if not os.path.isdir(image_root):
                raise FileNotFoundError(f"data.root={image_root} is not a directory; REPA reads the clean "
                                        f"images from the folder the cache was built from")
            # A byte array rather than a list of str: DataLoader workers would copy-on-read 1.28M objects.
            self.files = np.array([p.encode() for p in (self.dir / "files.txt").read_text().splitlines()])
        self._slices: dict[int, dict] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slices"] = {}  # safetensors handles do not pickle; each process reopens its own
        return state

    def _shard(self, k: int) -> dict:
        """Memory-mapped tensor slices of shard k, opened once per process."""
        if self._pid != os.getpid():  # forked into a worker: do not share the parent's handles
            self._slices, self._pid = {}, os.getpid()
        if k not in self._slices:
            handle = safe_open(str(shard_path(self.dir, k)), "pt")
            self._slices[k] = {name: handle.get_slice(name) for name in ("mean", "std", "labels", "index")}
        return self._slices[k]

    def __getitem__(self, idx: int | torch.Tensor) -> dict[str, torch.Tensor]:
        """Items idx (int64 1-D tensor or one int): float32 mean/std, labels, and images with image_root."""
        single = idx.ndim == 0 if torch.is_tensor(idx) else np.ndim(idx) == 0
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise IndexError(f"latent item {int(bad)} is out of range for the {len(self)} items in {self.dir}")
        shard = torch.searchsorted(self.offsets, idx, right=True) - 1
        rows = idx - self.offsets[shard]
        out = {"mean": torch.empty((len(idx), *self.latent_shape), dtype=torch.float32),
               "std": torch.empty((len(idx), *self.latent_shape), dtype=torch.float32),
               "labels": torch.empty(len(idx), dtype=torch.int64)}
        index = torch.empty(len(idx), dtype=torch.int64)
        for k in shard.unique().tolist():
            where = (shard == k).nonzero().squeeze(1)
            at = rows[where].tolist()
            slices = self._shard(k)
            out["mean"][where] = slices["mean"][at].float()
            out["std"][where] = slices["std"][at].float()
            out["labels"][where] = slices["labels"][at]
            index[where] = slices["index"][at]
        if self.files is not None:
            out["images"] = torch.stack([self._image(int(i)) for i in index]) if len(index) else \
                torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
        return {name: value[0] for name, value in out.items()} if single else out

    def _image(self, i: int) -> torch.Tensor:
        """The centre-cropped clean image of image index i (for REPA)."""
        path = os.path.join(self.image_root, self.files[i].decode())
        try:
            return load_image(path, self.image_size)
        except Exception as err:
            raise OSError(f"cannot read image {path} (image index {i}) for the latent cache {self.dir}: "
                          f"{err}. It decoded when the cache was built; check data.root") from err
