"""What one training step minimises: flow matching on the batch's latents, plus a representation
regulariser on the output of one block: REPA (alignment to DINOv2) and/or the dispersive loss.

A batch is a dict from one of the datasets: `labels`, and `images` (uint8; pixel models, or images
the VAE encodes on the fly) and/or `mean`/`std` (a cached VAE posterior, ddt.data.latents). Every
random draw (posterior sample, t, noise, dropped labels) comes from the trainer's generator, so a
resumed run draws the same numbers as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ddt.images import to_model_range
from ddt.flow import FlowDraws, dispersive_loss, draw_flow, velocity_loss
from ddt.models.repa import RepaLoss, capture_blocks, describe_widths, projector_widths
from ddt.models.vae import LatentCodec, sample_posterior


@dataclass(frozen=True)
class DispersiveLoss:
    """Dispersive loss (ddt.flow.dispersive_loss) on the output of block `layer` (1-based); no trainable state."""

    layer: int
    temperature: float = 0.5
    weight: float = 0.5


class Objective(nn.Module):
    """Flow-matching loss (+ weight × REPA / dispersive loss); trainable state is the REPA projector."""

    def __init__(self, *, codec: LatentCodec | None = None, scaling_factor: float | None = None,
                 repa: RepaLoss | None = None, dispersive: DispersiveLoss | None = None,
                 time_distribution: str = "lognorm", label_dropout: float = 0.1):
        super().__init__()
        self.codec, self.repa, self.dispersive = codec, repa, dispersive
        self.scaling_factor = codec.scaling_factor if codec is not None else scaling_factor
        self.time_distribution, self.label_dropout = time_distribution, label_dropout
        self.shard = (0, 1)  # (rank, world size): the trainer sets it when the batch is split over ranks

    def latents(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The model-space input of a batch: a posterior sample of the VAE, or pixels in [-1, 1]."""
        if "mean" in batch:
            if self.scaling_factor is None:
                raise ValueError("a batch of cached VAE moments needs the cache's scaling_factor")
            return sample_posterior(batch["mean"], batch["std"], self.scaling_factor, generator, self.shard)
        if self.codec is not None:
            return self.codec.encode(batch["images"], generator, self.shard)
        return to_model_range(batch["images"])

    def regularised_layers(self) -> list[int]:
        """The blocks (1-based) whose outputs REPA and the dispersive loss read."""
        return [*([self.repa.align_layer] if self.repa else []), *([self.dispersive.layer] if self.dispersive else [])]

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor],
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named loss terms) of one batch."""
        x = self.latents(batch, generator)
        draws = draw_flow(x, generator=generator, time_distribution=self.time_distribution,
                          label_dropout=self.label_dropout, shard=self.shard)
        repa_target = self.repa.target(batch["images"]) if self.repa is not None else None  # frozen: no draws
        return self.losses(model, x, batch["labels"], draws, repa_target)

    def losses(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, draws: FlowDraws,
               repa_target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named loss terms) for given draws and REPA target tokens (needed when REPA is on)."""
        with capture_blocks(model, self.regularised_layers()) as hidden:  # no layers: no hooks, plain flow matching
            fm_loss = velocity_loss(model, x, labels, draws)
        loss, terms = fm_loss, {"fm_loss": fm_loss}
        if self.repa is not None:
            terms["repa_loss"] = self.repa.alignment_loss(hidden[self.repa.align_layer][0], repa_target)
            loss = loss + self.repa.weight * terms["repa_loss"]
        if self.dispersive is not None:
            d = self.dispersive
            terms["dispersive_loss"] = dispersive_loss(hidden[d.layer][0], d.temperature, self.shard)
            loss = loss + d.weight * terms["dispersive_loss"]
        return loss, terms

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep besides the model (the REPA projector, when present)."""
        return self.repa.projector_state_dict() if self.repa is not None else {}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of trainable_state_dict."""
        if self.repa is not None:
            if not state:
                raise ValueError("the checkpoint holds no REPA projector (trained with repa off); use repa=off "
                                 "to resume it")
            have = projector_widths(state)
            if have != self.repa.widths:  # one clear line instead of load_state_dict's table of sizes
                raise ValueError(f"the checkpoint's REPA projector has widths {describe_widths(have)} but this one "
                                 f"{describe_widths(self.repa.widths)}; build it with projector_dim={have[1]}")
            self.repa.projector.load_state_dict(state)
        elif state:
            raise ValueError("the checkpoint holds a REPA projector but repa is off; use repa=on to resume it")
