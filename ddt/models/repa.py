"""REPA (representation alignment, arXiv 2410.06940) as DDT trains it.

The hidden tokens after block `align_layer` (1-based) are projected by a 3-layer SiLU MLP and
pulled towards the patch tokens of a frozen DINOv2 that sees the clean image; the loss is
1 − cosine similarity, averaged over tokens and images, and weighted 0.5 in the total loss.

DINOv2 comes from timm (`vit_base_patch14_dinov2.lvd142m`, from the Hugging Face hub, or a local
weights file for offline clusters). The image is ImageNet-normalised and resized bicubically so
that DINOv2 yields one token per DDT token: 224 px for 256 px images (16×16 tokens, as the
official code), 448 px for 512 px images.

`capture_blocks` records the output of any blocks during a forward; REPA reads block align_layer
through it, and so does the dispersive loss (ddt.objective) for its block.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddt.checkpoint import required_file

DINOV2_B14 = "vit_base_patch14_dinov2.lvd142m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TargetEncoder(nn.Module):
    """A frozen timm ViT (DINOv2) returning its final-norm patch tokens for uint8 images."""

    def __init__(self, name: str = DINOV2_B14, weights: str | None = None, *, grid_size: int,
                 **timm_kwargs):
        super().__init__()
        import timm

        patch = 14  # DINOv2's patch size; the input size gives grid_size² tokens
        overlay = {}
        if weights:
            path = required_file(weights, "repa.target_weights", f"Download model.safetensors of "
                                 f"https://huggingface.co/timm/{name} on a machine with internet and copy it there.")
            overlay = {"pretrained_cfg_overlay": {"file": str(path)}}
        try:
            self.net = timm.create_model(name, pretrained=True, num_classes=0, img_size=patch * grid_size,
                                         **overlay, **timm_kwargs)
        except Exception as err:
            raise FileNotFoundError(
                f"cannot load the REPA target encoder repa.target_encoder={name} ({type(err).__name__}: {err}). "
                f"Offline: download model.safetensors of https://huggingface.co/timm/{name} and pass "
                f"repa.target_weights=/path/to/model.safetensors") from err
        self.net.requires_grad_(False).eval()
        self.image_size = patch * grid_size
        self.dim = self.net.num_features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "TargetEncoder":
        return super().train(False)  # frozen: never dropout / stochastic depth

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, grid_size², dim) patch tokens."""
        x = (images.float() / 255 - self.mean) / self.std  # normalise, then resize (official order)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        tokens = self.net.forward_features(x)
        return tokens[:, self.net.num_prefix_tokens:]


@contextmanager
def capture_blocks(model: nn.Module, layers: Iterable[int]) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Within the block, outputs[layer] lists the outputs of model.blocks[layer − 1] (1-based), one per call."""
    outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [model.blocks[layer - 1].register_forward_hook(
        lambda module, args, output, seen=seen: seen.append(output)) for layer, seen in outputs.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def projector_widths(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """(input, hidden, hidden, output) widths of a 3-layer projector's state dict (keys 0/2/4.weight)."""
    return (state["0.weight"].shape[1], state["0.weight"].shape[0], state["2.weight"].shape[0],
            state["4.weight"].shape[0])


def describe_widths(widths: tuple[int, ...]) -> str:
    """`1152 -> 1152 -> 1152 -> 768`: a projector's widths as a log or error message writes them."""
    return " -> ".join(str(w) for w in widths)


class RepaLoss(nn.Module):
    """Projector + alignment loss; `capture(model)` records the hidden tokens of block align_layer.

    The projector is Linear(hidden, width), SiLU, Linear(width, width), SiLU, Linear(width, target);
    width = projector_dim, or the model's hidden_size when None (the official DDT configs'
    `proj_hidden_dim: *hidden_dim`; REPA's own SiT used 2048).
    """

    def __init__(self, target: TargetEncoder, *, hidden_size: int, align_layer: int,
                 projector_dim: int | None = None, weight: float = 0.5):
        super().__init__()
        self.target, self.align_layer, self.weight = target, align_layer, weight
        width = projector_dim or hidden_size
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, target.dim),
        )

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Within the block, the list holds the output of model.blocks[align_layer − 1]."""
        with capture_blocks(model, [self.align_layer]) as outputs:
            yield outputs[self.align_layer]

    def forward(self, hidden: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Mean of 1 − cos(projector(hidden), target(images)) over tokens and images."""
        return self.alignment_loss(hidden, self.target(images))

    def alignment_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean of 1 − cos(projector(hidden), target) for given target tokens (B, N, target width)."""
        if target.shape[1] != hidden.shape[1]:
            raise ValueError(f"REPA target has {target.shape[1]} tokens but the model has {hidden.shape[1]}; "
                             f"the image must be a multiple of the model's token grid")
        projected = self.projector(hidden)
        return (1 - F.cosine_similarity(projected.float(), target.float(), dim=-1)).mean()

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """(input, hidden, hidden, output) widths of the projector."""
        return projector_widths(self.projector.state_dict())

    def projector_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable state only (the frozen target encoder is never checkpointed)."""
        return self.projector.state_dict()
