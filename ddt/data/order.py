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


class StepBatches(torch.utils.data.Sampler):
    """The index batches of steps [start, stop): a DataLoader with batch_size=None loads them in order."""

    def __init__(self, start: int, stop: int, batch_size: int, dataset_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.start, self.stop = start, stop
        self.args = (batch_size, dataset_size, seed, rank, world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield batch_indices(step, *self.args)
