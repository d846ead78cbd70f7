"""Flow matching on the linear path: x_t = t·x + (1 − t)·ε, target v = x − ε (t = 0 noise, 1 data).

The path, the training-time distribution and the loss live here, apart from the network
(as in SiT's transport/): the model never knows which path it is trained on.
"""
from __future__ import annotations

import torch
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


def drop_labels(labels: torch.Tensor, probability: float, null_label: int,
                generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Replace labels by the null label with the given probability (classifier-free guidance)."""
    drop = rank_rows(torch.rand, tuple(labels.shape), generator, shard, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def flow_matching_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, *,
                       generator: torch.Generator, time_distribution: str = "lognorm",
                       label_dropout: float = 0.1, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Mean squared error between the predicted and the target velocity on a batch of clean x.

    `shard` = (rank, world size): x is this rank's share of a global batch (ddt.distributed.rank_rows).
    """
    t = sample_time(x.shape[0], time_distribution, generator, x.device, shard)
    noise = rank_rows(torch.randn, tuple(x.shape), generator, shard, device=x.device, dtype=x.dtype)
    labels = drop_labels(labels, label_dropout, model.num_classes, generator, shard)
    x_t, target = interpolate(x, noise, t)
    v, _ = model(x_t, t, labels)
    return (v.float() - target.float()).pow(2).mean()
