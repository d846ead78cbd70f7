"""Sampling to disk (PNGs + ADM-layout npz, resumable) and torch-fidelity metrics.

Digits runs measure FID/IS/KID/precision/recall with a small classifier trained on the digits data
(its weights ship with the repository; registered as torch-fidelity feature extractor
`digits-classifier`); ImageNet runs use
torch-fidelity's Inception-v3 (`inception-v3-compat`), from a local file or its download URL.
`eval.fd_dinov2` adds the Fréchet distance in DINOv2 features (EDM2, RAE) with torch-fidelity's
DINOv2 extractor, its network built from the official weights file instead of torch.hub.
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ddt.checkpoint import atomic_write_bytes, load, required_file
from ddt.images import to_uint8
from ddt.models.digits_classifier import DigitsClassifier
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
#                                   Metrics                                     #
#################################################################################

class UInt8Images(torch.utils.data.Dataset):
    """A uint8 (N, 3, H, W) tensor as the Dataset torch-fidelity expects."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _reference_dataset(reference) -> torch.utils.data.Dataset:
    return UInt8Images(reference) if isinstance(reference, torch.Tensor) else reference


def check_reference_npz(path: str | Path) -> Path:
    """Fail unless path is an ADM-style reference batch with mu and sigma (its images are not read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference batch {path} does not exist. Download it from the ADM suite "
            f"(https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
            f"{'512' if '512' in path.name else '256'}/{path.name}) and put it there or pass "
            f"eval.reference_npz=PATH")
    with np.load(path) as npz:
        missing = {"mu", "sigma"} - set(npz.files)
        if missing:
            raise ValueError(f"reference batch {path} has no {sorted(missing)} (arrays: {npz.files}); "
                             f"it must hold an ADM-style mu/sigma of Inception pool features")
    return path


def read_reference_npz(path: str | Path) -> dict[str, np.ndarray]:
    """mu, sigma (and arr_0 images, NHWC uint8, when present) of an ADM-suite reference batch."""
    with np.load(check_reference_npz(path)) as npz:
        return {k: npz[k] for k in ("mu", "sigma", "arr_0") if k in npz.files}


def calculate_metrics(samples: str | Path | torch.Tensor, reference: torch.Tensor | torch.utils.data.Dataset | Path,
                      *, feature_extractor: str, weights_path: str | Path, cache_dir: str | Path,
                      reference_name: str, prc: bool = True, kid: bool = False, isc: bool = True,
                      weights_tag: str | None = None, batch_size: int = 250, verbose: bool = True) -> dict[str, float]:
    """FID, IS (and precision/recall, KID) of samples (a folder or uint8 NCHW) against a reference.

    The reference is images (a uint8 NCHW tensor or a Dataset of uint8 CHW images; their features
    are cached under reference_name and weights_tag, default the weights' file name) or an ADM
    reference-batch npz: FID then uses the npz's own mu/sigma, and precision/recall/KID its images (arr_0).
    """
    import torch_fidelity
    from torch_fidelity import metric_fid, utils as fidelity_utils

    # torch-fidelity's output is tqdm bars: without a terminal they would garble the log.
    verbose = verbose and is_terminal()
    register_extractors()
    npz = read_reference_npz(reference) if isinstance(reference, (str, Path)) else None
    if npz is not None:
        if "arr_0" not in npz and (prc or kid):
            log.warning("reference batch %s has no images (arr_0): precision/recall/KID are skipped", reference)
            prc = kid = False
        input2 = UInt8Images(torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)) if (prc or kid) else None
    else:
        input2 = _reference_dataset(reference)
    weights_path = Path(weights_path)
    # Reference features are cached per (reference, extractor weights) so retraining invalidates them;
    # the samples' features are cached only for the length of this call (FID from an npz reuses them).
    samples_cache_name = f"samples-{uuid.uuid4().hex}"
    kwargs = dict(
        input1=str(samples) if isinstance(samples, (str, Path)) else UInt8Images(samples),
        input1_cache_name=samples_cache_name,
        cache_root=str(Path(cache_dir) / "fidelity"), cache=True,
        feature_extractor=feature_extractor, feature_extractor_weights_path=str(weights_path),
        batch_size=batch_size, cuda=torch.cuda.is_available(), save_cpu_ram=True,
        samples_find_ext="png", verbose=verbose,
    )
    if input2 is not None:
        kwargs.update(input2=input2,
                      input2_cache_name=f"{reference_name}-{feature_extractor}-{weights_tag or weights_path.stem}")
    if kid:  # torch-fidelity's default subset size (1000) but never more images than either side has
        num_samples = len(list(Path(samples).glob("*.png"))) if isinstance(samples, (str, Path)) else len(samples)
        kwargs["kid_subset_size"] = min(1000, len(input2), num_samples)
    try:
        metrics = torch_fidelity.calculate_metrics(fid=npz is None, isc=isc, prc=prc, kid=kid, **kwargs)
        if npz is not None:
            layer = fidelity_utils.resolve_feature_layer_for_metric("fid", **kwargs)
            extractor = fidelity_utils.create_feature_extractor(feature_extractor, [layer], **kwargs)
            features = fidelity_utils.extract_featuresdict_from_input_id_cached(1, extractor, **kwargs)
            stats = metric_fid.fid_featuresdict_to_statistics(features, layer)
            reference_stats = {"mu": npz["mu"].astype(stats["mu"].dtype),
                               "sigma": npz["sigma"].astype(stats["sigma"].dtype)}
            if reference_stats["mu"].shape != stats["mu"].shape:
                raise ValueError(f"reference batch {reference} has {reference_stats['mu'].shape[0]}-d statistics "
                                 f"but {feature_extractor} gives {stats['mu'].shape[0]}-d features")
            metrics.update(metric_fid.fid_statistics_to_metric(stats, reference_stats, verbose))
    finally:
        for path in (Path(cache_dir) / "fidelity").glob(f"{samples_cache_name}-*"):
            path.unlink(missing_ok=True)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "isc_mean",
             "inception_score_std": "isc_std", "precision": "precision", "recall": "recall",
             "f_score": "f_score", "kernel_inception_distance_mean": "kid_mean",
             "kernel_inception_distance_std": "kid_std"}
    return {names.get(k, k): float(v) for k, v in metrics.items()}


def fd_dinov2(samples: str | Path | torch.Tensor, reference: torch.Tensor | torch.utils.data.Dataset | Path, *,
              model: str, weights_path: str | Path, **kwargs) -> float:
    """FD-DINOv2: torch-fidelity's FID computed on the DINOv2 CLS features of samples and reference images.

    kwargs as calculate_metrics (cache_dir, reference_name, weights_tag, batch_size, verbose); the
    reference's features are cached like the Inception ones. An ADM npz has no DINOv2 statistics.
    """
    if isinstance(reference, (str, Path)):
        raise ValueError(NPZ_HAS_NO_DINOV2)
    return calculate_metrics(samples, reference, feature_extractor=model + LOCAL_DINOV2, weights_path=weights_path,
                             isc=False, prc=False, kid=False, **kwargs)["fid"]
