"""The ADM evaluator's metrics (openai/guided-diffusion's `evaluations/evaluator.py`; the math is in
ddt.adm_metrics): FID, sFID, Inception Score, precision and recall, plus torch-fidelity's KID, on
pool, logits and spatial activations of a feature extractor (ddt.extractors), the reference's cached
by content and weights; and `fd_dinov2`, the Fréchet distance in DINOv2 features (EDM2, RAE) through
torch-fidelity.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ddt import adm_metrics
from ddt.batches import (STAT_PAIRS, UInt8Images, as_dataset, count_images, image_batches, npz_header,
                         read_reference_stats)
from ddt.checkpoint import atomic_write_bytes
from ddt.extractors import LOCAL_DINOV2, build_extractor, register_extractors, spatial_layer
from ddt.models.digits_classifier import file_sha256
from ddt.progress import is_terminal, progress as progress_bar

log = logging.getLogger(__name__)
NPZ_HAS_NO_DINOV2 = ("eval.fd_dinov2=true needs DINOv2 statistics of the reference images, but the ADM reference "
                     "batch (eval.reference=adm_npz) holds only Inception ones; pass eval.reference=dataset "
                     "data.root=/path/to/imagenet/train (its DINOv2 and Inception statistics are computed once and "
                     "cached in cache_dir) or eval.fd_dinov2=false")
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv for sFID
ISC_PROTOCOLS = ("adm", "torch_fidelity")  # eval.isc_protocol


#################################################################################
#                     Activations: pool, logits, spatial                        #
#################################################################################

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


def metrics_device(device: torch.device | str | None) -> torch.device:
    """The device the feature extractors run on: the run's `device=`, or CUDA when present if none is given."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def current_cuda(device: torch.device) -> contextlib.AbstractContextManager:
    """torch-fidelity moves its extractors with .cuda(): make `device` the current CUDA device meanwhile."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def calculate_metrics(samples: str | Path | torch.Tensor | torch.utils.data.Dataset,
                      reference: torch.Tensor | torch.utils.data.Dataset | Path,
                      *, feature_extractor: str, weights_path: str | Path, cache_dir: str | Path,
                      reference_name: str = "reference", prc: bool = True, kid: bool = False, isc: bool = True,
                      isc_protocol: str = "adm", batch_size: int = 250, verbose: bool = True,
                      device: torch.device | str | None = None) -> dict[str, float]:
    """The ADM evaluator's FID, sFID, IS, precision, recall (and KID) of samples against a reference.

    samples: a folder of PNGs, an ADM-layout npz (arr_0 uint8 NHWC), a uint8 NCHW tensor or a Dataset of
    uint8 CHW images (a run's samples: ddt.samples.RunSamples). The reference is images (a uint8 NCHW
    tensor or a Dataset of uint8 CHW images) or an ADM reference batch npz: FID/sFID then use its
    mu/sigma and mu_s/sigma_s where present (else statistics of its arr_0), precision/recall/KID its
    images. Reference activations are cached by content (content_key).
    The extractor runs on `device` (see metrics_device).
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
    device = metrics_device(device)
    with current_cuda(device):
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


def fd_dinov2(samples: str | Path | torch.Tensor | torch.utils.data.Dataset,
              reference: torch.Tensor | torch.utils.data.Dataset | Path, *,
              model: str, weights_path: str | Path, cache_dir: str | Path, reference_name: str = "reference",
              batch_size: int = 250, verbose: bool = True, device: torch.device | str | None = None) -> float:
    """FD-DINOv2: torch-fidelity's FID computed on the DINOv2 CLS features of samples and reference images.

    The reference's features are cached by content and weights, as the Inception ones. An ADM npz has no
    DINOv2 statistics. The extractor runs on `device` (see metrics_device).
    """
    import torch_fidelity

    if isinstance(reference, (str, Path)):
        raise ValueError(NPZ_HAS_NO_DINOV2)
    register_extractors()
    name = model + LOCAL_DINOV2
    # torch-fidelity caches the samples' features too; they are removed after this call.
    samples_cache_name = f"samples-{uuid.uuid4().hex}"
    cache_root = Path(cache_dir) / "fidelity"
    device = metrics_device(device)
    try:
        with current_cuda(device):
            metrics = torch_fidelity.calculate_metrics(
                input1=str(samples) if isinstance(samples, (str, Path)) else as_dataset(samples),
                input1_cache_name=samples_cache_name, input2=_reference_dataset(reference),
                input2_cache_name=f"{reference_name}-{name}-{content_key(reference)[:16]}-"
                                  f"{file_sha256(weights_path)[:12]}",
                cache_root=str(cache_root), cache=True, fid=True, feature_extractor=name,
                feature_extractor_weights_path=str(weights_path), batch_size=batch_size,
                cuda=device.type == "cuda", save_cpu_ram=True, samples_find_ext="png",
                verbose=verbose and is_terminal())
    finally:
        for path in cache_root.glob(f"{samples_cache_name}-*"):
            path.unlink(missing_ok=True)
    return float(metrics["frechet_inception_distance"])
