"""Deterministic, resumable batch order: the batch of any step is a function of (seed, step)."""
from __future__ import annotations

import torch


def batch_indices(step: int, batch_size: int, dataset_size: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Indices of this rank's share of the global batch at `step` (a fresh permutation per epoch)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), dataset_size)
        perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return torch.tensor(out[rank::world_size])
