"""Which share of the work this process does: ranks from torchrun or SLURM, array tasks for caching.

A torchrun / `srun` job has a process rank (RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS); a SLURM
job array (`sbatch --array=0-31`) has independent tasks, each of which fills its own latent-cache
shards. Sweep points of a submitit sweep are also array tasks, so only the cache uses the array
index.
"""
from __future__ import annotations

import os


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a torchrun or srun job; (0, 1) when alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def cache_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size) for the latent cache: explicit values, a SLURM array task, or process_rank."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"data.cache_rank={rank} and data.cache_world_size={world_size} must both be set "
                             f"with 0 <= rank < world size")
        return rank, world_size
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return process_rank()
