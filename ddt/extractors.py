"""Feature extractors with their weights: torch-fidelity's Inception-v3 (`inception-v3-compat`, the
network of the ADM evaluator, openai/guided-diffusion's `evaluations/evaluator.py`) from a local file
or its download URL; the digits classifier (weights shipped with the repository) registered as
torch-fidelity extractor `digits-classifier`; and torch-fidelity's DINOv2 extractors (FD-DINOv2, as in
EDM2 and RAE) with the network built from the official weights file instead of torch.hub. Also which
layers give each extractor's pool, logits and sFID spatial features.
"""
from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path

import torch
import torch.nn as nn

from ddt.checkpoint import load, required_file
from ddt.models.digits_classifier import DigitsClassifier

DIGITS_EXTRACTOR = "digits-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# torch-fidelity's DINOv2 extractors and the timm class of the same network (timm ViTs load the official weights).
DINOV2_MODELS = {"dinov2-vit-s-14": "vit_small_patch14_dinov2", "dinov2-vit-b-14": "vit_base_patch14_dinov2",
                 "dinov2-vit-l-14": "vit_large_patch14_dinov2", "dinov2-vit-g-14": "vit_giant_patch14_dinov2"}
LOCAL_DINOV2 = "-file"  # registered as e.g. dinov2-vit-l-14-file: torch-fidelity's own name would use torch.hub
# Each extractor's (pool, logits) feature names: FID/precision/recall/KID on the first, IS on the second.
EXTRACTOR_LAYERS = {INCEPTION_EXTRACTOR: ("2048", "logits_unbiased"), DIGITS_EXTRACTOR: ("features", "logits")}


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
        path.parent.mkdir(parents=True, exist_ok=True)  # torch.hub writes its .partial file beside the target
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


def inception_weights_path(configured: str | None, cache_dir: str | Path, key: str = "eval.inception_weights") -> Path:
    """Local Inception weights for torch-fidelity: the configured file, or a cached download.

    key is how the caller's user sets the file, named in the advice as `key=PATH`: a launch.py setting
    or a command-line flag (`--inception-weights=PATH` is argparse syntax too).
    """
    path = pretrained_file(configured, key, INCEPTION_URL, cache_dir, "Inception-v3 (FID)")
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

