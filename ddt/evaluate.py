"""Sampling to disk (PNGs + ADM-layout npz, resumable) and the ADM evaluator's metrics.

Metrics follow openai/guided-diffusion's `evaluations/evaluator.py` (the math is in ddt.adm_metrics):
FID, sFID, Inception Score, precision and recall, plus torch-fidelity's KID, on activations of
torch-fidelity's Inception-v3 (`inception-v3-compat`, from a local file or its download URL). Digits
runs use a small classifier trained on the digits data instead (its weights ship with the repository;
registered as torch-fidelity feature extractor `digits-classifier`). `eval.fd_dinov2` adds the
Fréchet distance in DINOv2 features (EDM2, RAE) with torch-fidelity's DINOv2 extractor, its network
built from the official weights file instead of torch.hub.

Score any ADM-layout sample batch (arr_0 uint8 NHWC, e.g. from DiT's sample_ddp.py) the way the ADM
evaluator's command line does:

    python -m ddt.evaluate SAMPLES.npz VIRTUAL_imagenet256_labeled.npz [--inception-weights FILE]
        [--cache-dir DIR] [--out metrics.json]
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ddt import adm_metrics
from ddt.checkpoint import atomic_write_bytes, load, required_file
from ddt.images import to_uint8
from ddt.models.digits_classifier import DigitsClassifier, file_sha256
from ddt.progress import is_terminal, progress as progress_bar
from ddt.sampling import SamplingStats, sample

DIGITS_EXTRACTOR = "digits-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
log = logging.getLogger(__name__)
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# torch-fidelity's DINOv2 extractors and the timm class of the same network (timm ViTs load the official weights).
DINOV2_MODELS = {"dinov2-vit-s-14": "vit_small_patch14_dinov2", "dinov2-vit-b-14": "vit_base_patch14_dinov2",
                 "dinov2-vit-l-14": "vit_large_patch14_dinov2", "dinov2-vit-g-14": "vit_giant_patch14_dinov2"}
LOCAL_DINOV2 = "-file"  # registered as e.g. dinov2-vit-l-14-file: torch-fidelity's own name would use torch.hub
NPZ_HAS_NO_DINOV2 = ("eval.fd_dinov2=true needs DINOv2 statistics of the reference images, but the ADM reference "
                     "batch (eval.reference=adm_npz) holds only Inception ones; pass eval.reference=dataset "
                     "data.root=/path/to/imagenet/train (its DINOv2 and Inception statistics are computed once and "
                     "cached in cache_dir) or eval.fd_dinov2=false")


#################################################################################
#                               Samples on disk                                 #
#################################################################################

def sample_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: image i has class i mod num_classes."""
    return torch.arange(num_samples) % num_classes


def sample_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Per-image noise from (seed, image index): independent of batch size, rank and resumption."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
        for i in indices
    ])


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
    samples_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    labels = sample_labels(num_samples, model.num_classes)
    mine = range(rank, num_samples, world_size)
    todo = [i for i in mine if not (samples_dir / f"{i:06d}.png").exists()]
    stats = SamplingStats()
    start, done, stopped = time.perf_counter(), 0, False
    bar = progress_bar(len(mine), "sample", "img", initial=len(mine) - len(todo), enabled=progress)
    for first in range(0, len(todo), batch_size):
        if stop is not None and stop():
            stopped = True  # e.g. a preemption signal: the images written so far are kept for the rerun
            break
        batch = torch.tensor(todo[first:first + batch_size], dtype=torch.long)
        noise = sample_noise(batch, latent_shape, seed).to(device)
        # SDE noise is seeded by the batch's first image, so a resumed run redraws the same batches.
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + int(batch[0]) + 1)
        images = decode(sample(model, noise, labels[batch].to(device), generator=generator, stats=stats,
                               **sampler_kwargs))
        for i, image in zip(batch.tolist(), images.permute(0, 2, 3, 1).cpu().numpy()):
            write_png(image, samples_dir / f"{i:06d}.png")
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
    """The first num_samples PNGs as a uint8 NHWC array; fails naming the first missing file."""
    samples_dir = Path(samples_dir)
    images = []
    for i in range(num_samples):
        path = samples_dir / f"{i:06d}.png"
        if not path.exists():
            raise FileNotFoundError(f"sample {path} is missing ({i} of eval.num_samples={num_samples} "
                                    f"found); run the sample stage first (stage=[sample,evaluate])")
        images.append(np.asarray(Image.open(path).convert("RGB")))
    return np.stack(images)


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


#################################################################################
#                  Feature extractors for torch-fidelity                        #
#################################################################################

def _fidelity_base():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    return FeatureExtractorBase


def register_extractors() -> None:
    """Register the digits classifier and the file-loaded DINOv2 extractors with torch-fidelity (idempotent)."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if DIGITS_EXTRACTOR in FEATURE_EXTRACTORS_REGISTRY:
        return

    class DigitsFeatureExtractor(_fidelity_base()):
        """torch-fidelity adapter: `features` (FID, KID, PRC) and `logits` (IS) of the classifier."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError("the digits-classifier feature extractor needs feature_extractor_weights_path")
            checkpoint = load(feature_extractor_weights_path)
            self.net = DigitsClassifier(**checkpoint["config"])
            self.net.load_state_dict(checkpoint["state_dict"])

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            features, logits = self.net(x)
            named = {"features": features, "logits": logits}
            return tuple(named[name] for name in self.features_list)

    class FileDinoV2(FeatureExtractorDinoV2):
        """torch-fidelity's DINOv2 extractor (its 224-px resize, ImageNet normalisation and CLS feature)
        with the network built from a local weights file, where torch-fidelity's own calls torch.hub."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            _fidelity_base().__init__(self, name, features_list)  # not FeatureExtractorDinoV2's: no torch.hub
            self.feature_extractor_internal_dtype = torch.float32
            self.model = build_dinov2(name.removesuffix(LOCAL_DINOV2), feature_extractor_weights_path)
            self.requires_grad_(False).eval()

    torch_fidelity.register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)
    for name in DINOV2_MODELS:
        torch_fidelity.register_feature_extractor(name + LOCAL_DINOV2, FileDinoV2)


def pretrained_file(configured: str | None, key: str, url: str, cache_dir: str | Path, what: str) -> Path:
    """A pretrained weights file: the configured one, or cache_dir/<the URL's file name>, downloaded if missing.

    HF_HUB_OFFLINE=1 (how offline clusters say so) skips the download; a missing file names the key,
    the file and the URL to fetch it from on a machine with internet.
    """
    if configured:
        return required_file(configured, key, f"Download {url} on a machine with internet and copy it to that path.")
    path = Path(cache_dir) / Path(url).name
    if path.is_file():
        return path
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        finally:
            socket.setdefaulttimeout(previous)
    except Exception as err:
        raise FileNotFoundError(
            f"{what} weights are not available and could not be downloaded ({err}). Download {url} and either "
            f"put it at {path.resolve()} or pass {key}=/path/to/{path.name}.") from err
    return path


def inception_weights_path(configured: str | None, cache_dir: str | Path) -> Path:
    """Local Inception weights for torch-fidelity: the configured file, or a cached download."""
    path = pretrained_file(configured, "eval.inception_weights", INCEPTION_URL, cache_dir, "Inception-v3 (FID)")
    try:
        torch.load(path, map_location="cpu", weights_only=True)  # refuse pickled objects up front
    except Exception as err:
        raise RuntimeError(f"Inception weights {path} are not a plain state dict ({err}); "
                           f"download {INCEPTION_URL} again") from err
    return path


def dinov2_url(model: str) -> str:
    """Where torch.hub (and so torch-fidelity) downloads the official weights of a DINOv2 extractor."""
    from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA

    hub = MODEL_METADATA[model]  # e.g. dinov2_vitl14
    return f"https://dl.fbaipublicfiles.com/dinov2/{hub}/{hub}_pretrain.pth"


def dinov2_state_dict(state: dict, grid: int) -> dict[str, torch.Tensor]:
    """An official DINOv2 state dict in timm's names, its position embedding resized to grid² patches.

    The resize is DINOv2's own (`interpolate_pos_encoding` with the hub's defaults: bicubic, scale factor
    (grid + 0.1) / side with side 37 in the official files, no antialiasing), done once here instead of
    in every forward because torch-fidelity always feeds 224-px images.
    """
    out = {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v
           for k, v in state.items() if k != "mask_token"}  # mask_token: masked-image training only
    pos = out.get("pos_embed")
    if isinstance(pos, torch.Tensor) and pos.dim() == 3:
        side = math.isqrt(pos.shape[1] - 1)
        if side != grid:
            patches = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
            scale = (grid + 0.1) / side
            patches = torch.nn.functional.interpolate(patches, scale_factor=(scale, scale), mode="bicubic")
            out["pos_embed"] = torch.cat([pos[:, :1].float(), patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)],
                                         dim=1).to(pos.dtype)
    return out


def build_dinov2(model: str, weights: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The DINOv2 network of a torch-fidelity extractor name at 224 px with the official weights of `weights`.

    Its output is the final-norm CLS token, as the torch.hub model's. On the meta device only the
    file's tensor names and shapes are checked (nothing is read). Fails naming eval.dinov2_weights.
    """
    import timm
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    size = FeatureExtractorDinoV2.INPUT_IMAGE_SIZE
    fix = f"download {dinov2_url(model)} again, or set eval.dinov2_model to the model the file holds"
    with torch.device("meta"):  # no random initialisation (seconds for ViT-L on a CPU): every tensor is loaded
        net = timm.create_model(DINOV2_MODELS[model], pretrained=False, num_classes=0, img_size=size)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(f"eval.dinov2_weights={weights} is not a readable plain state dict ({reason}); "
                           f"{fix}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"eval.dinov2_weights={weights} is not a state dict of tensors; {fix}")
    state = dinov2_state_dict(state, size // net.patch_embed.patch_size[0])
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    wrong = sorted(k for k, v in state.items() if k in expected and tuple(v.shape) != expected[k])
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        example = (wrong or missing or unexpected)[0]
        raise RuntimeError(f"eval.dinov2_weights={weights} does not hold {model} ({len(wrong)} tensors of another "
                           f"shape, {len(missing)} missing, {len(unexpected)} unexpected, e.g. {example}); {fix}")
    if torch.device(device).type != "meta":
        net.to_empty(device=device).load_state_dict(state)  # strict: every parameter (the net has no buffers)
    return net.requires_grad_(False).eval()


def dinov2_weights_path(configured: str | None, cache_dir: str | Path, model: str) -> Path:
    """Official weights of the DINOv2 extractor `model`: the configured file or a cached download, checked."""
    path = pretrained_file(configured, "eval.dinov2_weights", dinov2_url(model), cache_dir,
                           f"DINOv2 ({model}, FD-DINOv2)")
    build_dinov2(model, path, device="meta")
    return path


#################################################################################
#                     Activations: pool, logits, spatial                        #
#################################################################################

SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv for sFID
# Each extractor's (pool, logits) feature names: FID/precision/recall/KID on the first, IS on the second.
EXTRACTOR_LAYERS = {INCEPTION_EXTRACTOR: ("2048", "logits_unbiased"), DIGITS_EXTRACTOR: ("features", "logits")}


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
        return torch.from_numpy(np.asarray(Image.open(self.paths[i]).convert("RGB"))).permute(2, 0, 1)


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


def build_extractor(name: str, weights_path: str | Path, device: torch.device) -> nn.Module:
    """torch-fidelity's feature extractor `name` giving (pool, logits) features, weights from weights_path."""
    from torch_fidelity.utils import create_feature_extractor

    register_extractors()
    if name not in EXTRACTOR_LAYERS:
        raise ValueError(f"eval.feature_extractor={name!r} has no pool/logits/spatial layers; "
                         f"use one of {sorted(EXTRACTOR_LAYERS)}")
    return create_feature_extractor(name, list(EXTRACTOR_LAYERS[name]), cuda=device.type == "cuda",
                                    feature_extractor_weights_path=str(weights_path), verbose=False)


def spatial_layer(extractor: nn.Module) -> nn.Module:
    """The layer of sFID's spatial features: ADM's mixed_6/conv (Inception's Mixed_6d.branch1x1, 17×17×192,
    after its ReLU), or for the digits classifier its analogue, the second conv after its ReLU (8×8×64)."""
    if hasattr(extractor, "Mixed_6d"):
        return extractor.Mixed_6d.branch1x1
    return extractor.net.conv[3]


def nhwc_flat(maps: torch.Tensor) -> np.ndarray:
    """First SPATIAL_CHANNELS channels of NCHW maps flattened in NHWC order, as ADM's spatial features."""
    return maps[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(maps), -1).float().cpu().numpy()


def extract_activations(images, extractor: nn.Module, *, batch_size: int, desc: str,
                        verbose: bool = False) -> dict[str, np.ndarray]:
    """float32 `pool`, `logits` and NHWC `spatial` activations of every image, in order."""
    device = next(extractor.parameters()).device
    spatial, pool, logits = [], [], []
    hook = spatial_layer(extractor).register_forward_hook(lambda module, inputs, out: spatial.append(nhwc_flat(out)))
    bar = progress_bar(count_images(images), desc, "img", enabled=verbose)
    try:
        with torch.no_grad():
            for batch in image_batches(images, batch_size):
                features, batch_logits = extractor(batch.to(device))
                pool.append(features.float().cpu().numpy())
                logits.append(batch_logits.float().cpu().numpy())
                bar.update(len(batch))
    finally:
        hook.remove()
        bar.close()
    return {"pool": np.concatenate(pool), "logits": np.concatenate(logits), "spatial": np.concatenate(spatial)}


#################################################################################
#                  Reference activations, cached by content                     #
#################################################################################

def content_key(reference) -> str:
    """A hash of what a reference holds: an npz's bytes, a tensor's bytes, or an image folder's file list,
    sizes and mtimes (and the image size it is read at), so a replaced reference is never mistaken for the old."""
    if isinstance(reference, (str, Path)):
        return file_sha256(reference)
    if isinstance(reference, UInt8Images):
        reference = reference.images
    if isinstance(reference, torch.Tensor):
        array = reference.contiguous().cpu().numpy()
        return hashlib.sha256(repr((array.shape, str(array.dtype))).encode() + array.tobytes()).hexdigest()
    folder = getattr(reference, "folder", None)  # ddt.data.imagenet.FolderImages
    if folder is not None and hasattr(folder, "files"):
        listing = [(name, *(lambda s: (s.st_size, s.st_mtime_ns))(os.stat(os.path.join(folder.root, name))))
                   for name in folder.files]
        return hashlib.sha256(json.dumps([folder.image_size, listing]).encode()).hexdigest()
    raise TypeError(f"cannot key cached reference features on the content of a {type(reference).__name__}; "
                    f"pass a uint8 tensor, an ImageFolder's FolderImages or an npz path")


def reference_activations(reference, extractor: nn.Module, *, extractor_name: str, weights_path: str | Path,
                          cache_dir: str | Path, reference_name: str, batch_size: int,
                          verbose: bool = False) -> dict[str, np.ndarray]:
    """Activations of the reference images, from cache_dir/reference/ when this content and these weights
    made them before (the entry used is logged), else extracted and stored there (temp file + rename)."""
    images = reference if isinstance(reference, (str, Path)) else _reference_dataset(reference)
    entry = (Path(cache_dir) / "reference" /
             f"{reference_name or 'reference'}-{extractor_name}-{content_key(reference)[:16]}-"
             f"{file_sha256(weights_path)[:12]}.npz")
    if entry.is_file():
        log.info("reference features: cache entry %s", entry)
        with np.load(entry) as cached:
            return {k: cached[k] for k in cached.files}
    activations = extract_activations(images, extractor, batch_size=batch_size, desc="reference features",
                                      verbose=verbose)
    atomic_write_bytes(entry, lambda f: np.savez(f, **activations))
    log.info("reference features: new cache entry %s", entry)
    return activations


#################################################################################
#                                   Metrics                                     #
#################################################################################

def _reference_dataset(reference) -> torch.utils.data.Dataset:
    return UInt8Images(reference) if isinstance(reference, torch.Tensor) else reference


STAT_PAIRS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}  # what an ADM reference batch stores
ISC_PROTOCOLS = ("adm", "torch_fidelity")  # eval.isc_protocol


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


def frechet_metric(name: str, activations: np.ndarray, reference: tuple[np.ndarray, np.ndarray], source) -> float:
    """ADM's Fréchet distance of activations' statistics to reference (mu, sigma); fails naming a size mismatch."""
    if np.shape(reference[0]) != activations.shape[1:]:
        raise ValueError(f"reference {source} has {np.shape(reference[0])[0]}-d statistics for {name} but the feature "
                         f"extractor gives {activations.shape[1]}-d features; use the reference batch made for it")
    return adm_metrics.frechet_distance_of(activations, *reference)


def inception_score(logits: np.ndarray, protocol: str) -> dict[str, float]:
    """isc_mean/isc_std by ADM's consecutive 5,000-sample splits or torch-fidelity's 10 shuffled splits."""
    if protocol == "torch_fidelity":
        from torch_fidelity.metric_isc import isc_features_to_metric

        out = isc_features_to_metric(torch.from_numpy(logits))  # its defaults: 10 splits, shuffled, seed 2020
        return {"isc_mean": float(out["inception_score_mean"]), "isc_std": float(out["inception_score_std"])}
    mean, std = adm_metrics.inception_score(logits)
    return {"isc_mean": mean, "isc_std": std}


def kernel_inception_distance(samples: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """torch-fidelity's unbiased KID: its subset size (1000) but never more images than either side has."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    out = kid_features_to_metric(torch.from_numpy(samples), torch.from_numpy(reference), verbose=False,
                                 kid_subset_size=min(1000, len(samples), len(reference)))
    return {"kid_mean": float(out["kernel_inception_distance_mean"]),
            "kid_std": float(out["kernel_inception_distance_std"])}


def calculate_metrics(samples: str | Path | torch.Tensor, reference: torch.Tensor | torch.utils.data.Dataset | Path,
                      *, feature_extractor: str, weights_path: str | Path, cache_dir: str | Path,
                      reference_name: str = "reference", prc: bool = True, kid: bool = False, isc: bool = True,
                      isc_protocol: str = "adm", batch_size: int = 250, verbose: bool = True) -> dict[str, float]:
    """The ADM evaluator's FID, sFID, IS, precision, recall (and KID) of samples against a reference.

    samples: a folder of PNGs, an ADM-layout npz (arr_0 uint8 NHWC) or a uint8 NCHW tensor. The
    reference is images (a uint8 NCHW tensor or a Dataset of uint8 CHW images) or an ADM reference
    batch npz: FID/sFID then use its mu/sigma and mu_s/sigma_s where present (else statistics of its
    arr_0), precision/recall/KID its images. Reference activations are cached by content (content_key).
    """
    if isc_protocol not in ISC_PROTOCOLS:
        raise ValueError(f"eval.isc_protocol={isc_protocol!r} is unknown; use {' or '.join(ISC_PROTOCOLS)}")
    stored = read_reference_stats(reference) if isinstance(reference, (str, Path)) else {}
    has_images = not isinstance(reference, (str, Path)) or npz_header(reference) is not None
    if not has_images and (prc or kid):
        log.warning("reference batch %s has no images (arr_0): precision/recall/KID are skipped", reference)
        prc = kid = False
    if not has_images and "sfid" not in stored:
        log.warning("reference batch %s has neither mu_s/sigma_s nor images (arr_0): sFID is skipped", reference)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = build_extractor(feature_extractor, weights_path, device)
    acts = extract_activations(samples, extractor, batch_size=batch_size, desc="sample features", verbose=verbose)
    ref = None
    if has_images and (prc or kid or len(stored) < len(STAT_PAIRS)):
        ref = reference_activations(reference, extractor, extractor_name=feature_extractor, weights_path=weights_path,
                                    cache_dir=cache_dir, reference_name=reference_name, batch_size=batch_size,
                                    verbose=verbose)
    metrics = {}
    for metric, layer in (("fid", "pool"), ("sfid", "spatial")):
        stats = stored.get(metric)
        if stats is None and ref is not None:
            stats = adm_metrics.statistics(ref[layer])
        if stats is not None:
            metrics[metric] = frechet_metric(metric, acts[layer], stats, reference)
    if isc:
        metrics.update(inception_score(acts["logits"], isc_protocol))
    if prc:
        metrics["precision"], metrics["recall"] = adm_metrics.precision_recall(ref["pool"], acts["pool"])
    if kid:
        metrics.update(kernel_inception_distance(acts["pool"], ref["pool"]))
    return metrics


def fd_dinov2(samples: str | Path | torch.Tensor, reference: torch.Tensor | torch.utils.data.Dataset | Path, *,
              model: str, weights_path: str | Path, cache_dir: str | Path, reference_name: str = "reference",
              batch_size: int = 250, verbose: bool = True) -> float:
    """FD-DINOv2: torch-fidelity's FID computed on the DINOv2 CLS features of samples and reference images.

    The reference's features are cached by content and weights, as the Inception ones. An ADM npz has no
    DINOv2 statistics.
    """
    import torch_fidelity

    if isinstance(reference, (str, Path)):
        raise ValueError(NPZ_HAS_NO_DINOV2)
    register_extractors()
    name = model + LOCAL_DINOV2
    # torch-fidelity caches the samples' features too; they are removed after this call.
    samples_cache_name = f"samples-{uuid.uuid4().hex}"
    cache_root = Path(cache_dir) / "fidelity"
    try:
        metrics = torch_fidelity.calculate_metrics(
            input1=str(samples) if isinstance(samples, (str, Path)) else UInt8Images(samples),
            input1_cache_name=samples_cache_name, input2=_reference_dataset(reference),
            input2_cache_name=f"{reference_name}-{name}-{content_key(reference)[:16]}-{file_sha256(weights_path)[:12]}",
            cache_root=str(cache_root), cache=True, fid=True, feature_extractor=name,
            feature_extractor_weights_path=str(weights_path), batch_size=batch_size, cuda=torch.cuda.is_available(),
            save_cpu_ram=True, samples_find_ext="png", verbose=verbose and is_terminal())
    finally:
        for path in cache_root.glob(f"{samples_cache_name}-*"):
            path.unlink(missing_ok=True)
    return float(metrics["frechet_inception_distance"])


#################################################################################
#            Command line: score an ADM-layout sample batch                     #
#################################################################################

def batch_problems(path: str | Path, role: str) -> list[str]:
    """One line per problem that stops `path` from serving as an ADM `role` batch ("sample" or "reference")."""
    path = Path(path)
    if not path.is_file():
        return [f"{role} batch {path} does not exist"]
    try:
        with np.load(path) as npz:
            files = set(npz.files)
        header = npz_header(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return [f"{role} batch {path} is not an npz file ({' '.join(str(err).split()) or type(err).__name__}); "
                f"save it with np.savez(path, arr_0=images)"]
    problems = []
    if header is None:
        stats = "" if role == "sample" else (" (precision and recall need the reference images"
                                              + ("" if {"mu_s", "sigma_s"} <= files else ", and it has no "
                                                 "mu_s/sigma_s to give sFID without them") + ")")
        problems.append(f"{role} batch {path} has no arr_0 (arrays: {sorted(files)}){stats}; it must hold "
                        f"uint8 images N×H×W×3 in arr_0")
    else:
        shape, dtype = header
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
            problems.append(f"{role} batch {path}: arr_0 is {dtype} of shape {shape}; it must be uint8 N×H×W×3 "
                            f"(NHWC, 0-255), as np.savez(path, arr_0=images) of the ADM suite")
    for metric, pair in STAT_PAIRS.items():
        if len(set(pair) & files) == 1:
            problems.append(f"{role} batch {path} has {sorted(set(pair) & files)[0]} without "
                            f"{sorted(set(pair) - files)[0]}; {metric} needs both (or neither, to compute them)")
    return problems


def score_batches(samples: Path, reference: Path, weights: Path, cache_dir: Path, batch_size: int) -> dict:
    """The five ADM metrics of a sample batch against a reference batch, with what made them."""
    metrics = calculate_metrics(samples, reference, feature_extractor=INCEPTION_EXTRACTOR, weights_path=weights,
                                cache_dir=cache_dir, reference_name=reference.stem, prc=True, kid=False,
                                isc_protocol="adm", batch_size=batch_size)
    return {**metrics, "isc_protocol": "adm", "num_samples": count_images(samples), "samples": str(samples),
            "reference": str(reference), "reference_sha256": file_sha256(reference),
            "feature_extractor": {"name": INCEPTION_EXTRACTOR, "weights": str(weights),
                                  "sha256": file_sha256(weights)}}


ADM_LINES = (("Inception Score", "isc_mean"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
             ("Recall", "recall"))


def main(argv: list[str] | None = None) -> int:
    """`python -m ddt.evaluate SAMPLES.npz REFERENCE.npz`: print and write the ADM evaluator's five metrics."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ddt.evaluate", description=main.__doc__)
    parser.add_argument("samples", type=Path, help="sample batch npz: arr_0 uint8 N×H×W×3")
    parser.add_argument("reference", type=Path, help="reference batch npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--inception-weights", default=None,
                        help=f"torch-fidelity Inception-v3 weights (default: CACHE_DIR/{Path(INCEPTION_URL).name})")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DDT_CACHE_DIR", ".cache/ddt")),
                        help="weights and cached reference activations (default: $DDT_CACHE_DIR or .cache/ddt)")
    parser.add_argument("--out", type=Path, default=None, help="metrics JSON (default: SAMPLES with .metrics.json)")
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    problems = batch_problems(args.samples, "sample") + batch_problems(args.reference, "reference")
    try:
        weights = inception_weights_path(args.inception_weights, args.cache_dir) if not problems else None
    except (OSError, RuntimeError) as err:
        problems.append(" ".join(str(err).split()))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    result = score_batches(args.samples, args.reference, weights, args.cache_dir, args.batch_size)
    for label, key in ADM_LINES:
        print(f"{label}: {result[key]}")
    out = args.out or args.samples.with_suffix(".metrics.json")
    atomic_write_bytes(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"metrics written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
