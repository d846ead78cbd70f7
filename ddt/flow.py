"""Flow matching on the linear path: x_t = t·x + (1 − t)·ε, target v = x − ε (t = 0 noise, 1 data).

The path, the training-time distribution and the losses live here, apart from the network
(as in SiT's transport/): the model never knows which path it is trained on. The dispersive loss
(Wang & He, arXiv 2506.09027) regularises the network's own hidden states and needs no encoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ddt.distributed import rank_rows

TIME_DISTRIBUTIONS = ("lognorm", "uniform")


def sample_time(batch_size: int, distribution: str, generator: torch.Generator,
                device: torch.device, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Training times: `lognorm` sigmoid(N(0, 1)) or `uniform` U(0, 1) (this rank's rows)."""
    if distribution == "lognorm":
        return rank_rows(torch.randn, (batch_size,), generator, shard, device=device).sigmoid()
    if distribution == "uniform":
        return rank_rows(torch.rand, (batch_size,), generator, shard, device=device)
    raise ValueError(f"unknown time distribution {distribution!r}; choose one of {TIME_DISTRIBUTIONS}")


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Point x_t on the path and its velocity target x − ε."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return t * x + (1 - t) * noise, x - noise


@dataclass(frozen=True)
class FlowDraws:
    """The random numbers of one flow-matching step: times t, noise ε, and which labels become the null label."""

    t: torch.Tensor
    noise: torch.Tensor
    dropped: torch.Tensor  # bool, one per label


def draw_flow(x: torch.Tensor, *, generator: torch.Generator, time_distribution: str = "lognorm",
              label_dropout: float = 0.1, shard: tuple[int, int] = (0, 1)) -> FlowDraws:
    """Draw t, then ε, then the label-dropout mask (this order is what a resumed run replays)."""
    t = sample_time(x.shape[0], time_distribution, generator, x.device, shard)
    noise = rank_rows(torch.randn, tuple(x.shape), generator, shard, device=x.device, dtype=x.dtype)
    dropped = rank_rows(torch.rand, (x.shape[0],), generator, shard, device=x.device) < label_dropout
    return FlowDraws(t, noise, dropped)


def drop_labels(labels: torch.Tensor, dropped: torch.Tensor, null_label: int) -> torch.Tensor:
    """The labels with the dropped ones replaced by the null label (classifier-free guidance)."""
    return torch.where(dropped, torch.full_like(labels, null_label), labels)


def velocity_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, draws: FlowDraws) -> torch.Tensor:
    """Mean squared error between the predicted and the target velocity for given draws."""
    x_t, target = interpolate(x, draws.noise, draws.t)
    v, _ = model(x_t, draws.t, drop_labels(labels, draws.dropped, model.num_classes))
    return (v.float() - target.float()).pow(2).mean()


def flow_matching_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *,
                       generator: torch.Generator, time_distribution: str = "lognorm",
                       label_dropout: float = 0.1, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Mean squared error between the predicted and the target velocity on a batch of clean x.

    `shard` = (rank, world size): x is this rank's share of a global batch (ddt.distributed.rank_rows).
    """
    draws = draw_flow(x, generator=generator, time_distribution=time_distribution, label_dropout=label_dropout,
                      shard=shard)
    return velocity_loss(model, x, labels, draws)


class _GatherRows(torch.autograd.Function):
    """all_gather of every rank's rows whose backward sums the ranks' gradients and keeps this rank's rows.

    A plain torch.distributed.all_gather into fresh buffers carries no gradient (the official DDT
    DisperseTrainer's bug); torch.distributed.nn's differentiable all_gather is deprecated in torch 2.14.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), z.shape[0]
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # SUM: every rank's loss depends on every rank's rows
        return grad[ctx.rank]


def gather_rows(z: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """The global batch from every rank's rows rank::world_size, in one process's order, with gradients."""
    if shard[1] == 1:
        return z
    parts = _GatherRows.apply(z)  # (world size, rows, ...): rank r holds global rows r, r + W, r + 2W, ...
    return parts.transpose(0, 1).reshape(z.shape[0] * shard[1], *z.shape[1:])


def dispersive_loss(z: torch.Tensor, temperature: float, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """InfoNCE-L2 dispersive loss: log of the mean over all B×B pairs of exp(−‖z_i − z_j‖² / (D·τ)).

    z is (B, ...), flattened to (B, D) per sample; i = j pairs are included, as in the authors' PyTorch
    release (which divides by D and has τ = 1). `shard` = (rank, world size): z is this rank's share
    of a global batch, gathered with gradients (every rank then holds the global loss, and
    DistributedDataParallel's mean over ranks gives the global gradient). Computed in float32 (or
    float64 for float64 z) as logsumexp − log(B²); minimising it pushes the samples' representations apart.
    """
    with torch.autocast(z.device.type, enabled=False):  # bf16 hidden states: distances in float32
        z = gather_rows(z.flatten(1).to(torch.promote_types(z.dtype, torch.float32)), shard)
        n, dim = z.shape
        # pdist: exact distances of the B(B−1)/2 pairs i < j; each counts twice, the B zeros of i = j once
        logits = -torch.pdist(z).pow(2) / (dim * temperature)
        pairs = torch.cat([logits + math.log(2.0), logits.new_zeros(n)])
        return torch.logsumexp(pairs, dim=0) - 2 * math.log(n)
