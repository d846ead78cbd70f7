"""The pieces a run needs, built from the plain config before any stage starts.

Dataset, VAE, REPA target encoder, FID feature extractor and reference are all loaded (or at least
found) here, so a missing file stops the run at once with a message that names it and says where
to get it, never hours into training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ddt.data.digits import load_digits
from ddt.data.imagenet import FolderImages, ImageFolder, ImageFolderBatches
from ddt.data.latents import LatentDataset
from ddt.data.pixels import ImageTensors
from ddt.batches import check_reference_npz
from ddt.extractors import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, dinov2_weights_path, inception_weights_path
from ddt.checkpoint import load
from ddt.errors import UsageError
from ddt.models.digits_classifier import file_sha256, shipped_weights
from ddt.models.repa import RepaLoss, TargetEncoder
from ddt.models.vae import LatentCodec
from ddt.config import dispersive_layer
from ddt.objective import DispersiveLoss, Objective

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """What the stages of one run use; a field is None when no stage asked for it."""

    image_folder: ImageFolder | None = None
    train_data: torch.utils.data.Dataset | None = None
    codec: LatentCodec | None = None
    objective: Objective | None = None
    extractor: dict | None = None
    dinov2: dict | None = None  # FD-DINOv2's extractor (eval.fd_dinov2)
    reference: torch.Tensor | torch.utils.data.Dataset | Path | None = None
    reference_name: str = ""


def load_codec(plain: dict) -> LatentCodec | None:
    """The VAE of `resolution.vae` (None in pixel space)."""
    name = plain["resolution"].get("vae")
    if not name:
        return None
    codec = LatentCodec.from_pretrained(name)
    log.info("VAE %s: scaling factor %g, %dx downsampling", name, codec.scaling_factor, codec.downsample)
    return codec


def training_data(plain: dict, digits: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.utils.data.Dataset, float | None]:
    """The training set of the `data` group and, for the latent cache, its VAE scaling factor."""
    data, res = plain["data"], plain["resolution"]
    if data["name"] == "digits":
        return ImageTensors(*digits), None
    if data["name"] == "imagenet":
        return ImageFolderBatches(ImageFolder(data["root"], res["image_size"])), None
    if data["name"] == "imagenet_latents":
        image_root = data["root"] if plain["repa"]["enabled"] else None  # REPA needs the clean images
        dataset = LatentDataset(data["latents_dir"], image_root=image_root)
        expected = (res["channels"], res["latent_size"], res["latent_size"])
        if tuple(dataset.latent_shape) != expected or dataset.num_classes != data["num_classes"]:
            raise ValueError(f"latent cache {data['latents_dir']} holds {dataset.num_classes} classes of "
                             f"{tuple(dataset.latent_shape)} latents but the config wants {data['num_classes']} "
                             f"of {expected}; point data.latents_dir at the cache for resolution.image_size="
                             f"{res['image_size']}")
        return dataset, dataset.scaling_factor
    raise ValueError(f"data.name={data['name']!r} is unknown; use data=digits, imagenet or imagenet_latents")


def build_objective(plain: dict, codec: LatentCodec | None, scaling_factor: float | None) -> Objective:
    """Flow matching (+ REPA when repa.enabled, + the dispersive loss when repa.dispersive) with the train
    group's time sampling and label dropout."""
    repa, model, train = plain["repa"], plain["model"], plain["train"]
    repa_loss = None
    if repa["enabled"]:
        grid = plain["resolution"]["latent_size"] // model["patch_size"]  # one DINOv2 token per DDT token
        target = TargetEncoder(repa["target_encoder"], repa["target_weights"], grid_size=grid,
                               **(repa["target_kwargs"] or {}))
        repa_loss = RepaLoss(target, hidden_size=model["hidden_size"], align_layer=repa["align_layer"],
                             projector_dim=repa["projector_dim"], weight=repa["weight"])
        log.info("REPA: block %d aligned to %s (%d-d tokens at %d px), weight %g", repa["align_layer"],
                 repa["target_encoder"], target.dim, target.image_size, repa["weight"])
    dispersive = None
    if repa.get("dispersive"):
        dispersive = DispersiveLoss(layer=dispersive_layer(plain), temperature=repa["temperature"],
                                    weight=repa["weight"])
        log.info("dispersive loss: block %d, temperature %g, weight %g", dispersive.layer, dispersive.temperature,
                 dispersive.weight)
    encodes_images = plain["data"]["name"] == "imagenet"
    return Objective(codec=codec if encodes_images else None, scaling_factor=scaling_factor, repa=repa_loss,
                     dispersive=dispersive, time_distribution=train["time_distribution"],
                     label_dropout=train["label_dropout"])


def feature_extractor(plain: dict) -> dict:
    """Name, weights and weights' SHA-256 of the evaluation's torch-fidelity feature extractor (found now)."""
    ev, cache_dir = plain["eval"], Path(plain["cache_dir"])
    if ev["feature_extractor"] == DIGITS_EXTRACTOR:
        path, digest = shipped_weights(ev["digits_classifier"])
        accuracy = float(load(path)["test_accuracy"])
        log.info("digits classifier %s (sha256 %s): held-out accuracy %.4f", path.name, digest[:12], accuracy)
        return {"name": DIGITS_EXTRACTOR, "version": ev["digits_classifier"], "weights": str(path),
                "sha256": digest, "test_accuracy": accuracy}
    if ev["feature_extractor"] == INCEPTION_EXTRACTOR:
        path = inception_weights_path(ev.get("inception_weights"), cache_dir)
        return {"name": INCEPTION_EXTRACTOR, "weights": str(path), "sha256": file_sha256(path)}
    raise ValueError(f"eval.feature_extractor={ev['feature_extractor']!r} is not available; "
                     f"use {DIGITS_EXTRACTOR} or {INCEPTION_EXTRACTOR}")


def dinov2_extractor(plain: dict) -> dict:
    """Name, weights and weights' SHA-256 of FD-DINOv2's extractor (eval.fd_dinov2; found and checked now)."""
    ev = plain["eval"]
    path = dinov2_weights_path(ev.get("dinov2_weights"), Path(plain["cache_dir"]), ev["dinov2_model"])
    return {"name": ev["dinov2_model"], "weights": str(path), "sha256": file_sha256(path)}


def evaluation_reference(plain: dict, digits: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[object, str]:
    """What samples are compared with, and the name its cached features go under."""
    ev, data, res = plain["eval"], plain["data"], plain["resolution"]
    if data["name"] == "digits":
        return digits[0], f"digits{res['image_size']}"
    if ev.get("reference") == "adm_npz":
        path = Path(ev.get("reference_npz") or Path(plain["cache_dir"]) / res["adm_reference"]).expanduser()
        return check_reference_npz(path), path.stem
    if ev.get("reference") == "dataset":
        folder = ImageFolder(data["root"], res["image_size"])
        return FolderImages(folder), f"imagenet{res['image_size']}-{len(folder)}"
    raise ValueError(f"eval.reference={ev.get('reference')!r} is unknown; use adm_npz or dataset")


def prepare(plain: dict, todo: list[str]) -> Parts:
    """Load or find everything the stages in `todo` need, before any work is done.

    Every missing or unreadable file is reported together (one UsageError, a line each), so a
    cluster user fixes the VAE, the DINOv2 weights and the data folder in one go.
    """
    parts, problems = Parts(), []

    def attempt(load, *args):
        try:
            return load(*args)
        except UsageError as err:
            problems.extend(err.problems)
        except (OSError, ValueError, RuntimeError) as err:  # a library's own message names the file or key
            problems.append(" ".join(str(err).split()) or f"{type(err).__name__} in {load.__name__}")
        return None

    data, ev = plain["data"], plain["eval"]
    curve = "curve" in todo or ("train" in todo and ev.get("every_steps"))
    evaluating = ev["name"] != "none" and ("evaluate" in todo or curve)
    digits = load_digits(plain["resolution"]["image_size"]) if data["name"] == "digits" else None
    if evaluating:
        parts.extractor = attempt(feature_extractor, plain)
        if ev.get("fd_dinov2"):
            parts.dinov2 = attempt(dinov2_extractor, plain)
        parts.reference, parts.reference_name = attempt(evaluation_reference, plain, digits) or (None, "")
    if "cache_latents" in todo:
        parts.image_folder = attempt(ImageFolder, data["root"], plain["resolution"]["image_size"])
    if "train" in todo:
        parts.train_data, scaling_factor = attempt(training_data, plain, digits) or (None, None)
    if {"cache_latents", "sample"} & set(todo) or curve or ("train" in todo and data["name"] == "imagenet"):
        parts.codec = attempt(load_codec, plain)
    if "train" in todo:  # also when the data or VAE failed: a missing DINOv2 file is reported with them
        parts.objective = attempt(build_objective, plain, parts.codec, scaling_factor)
    if problems:
        raise UsageError(problems)
    return parts
