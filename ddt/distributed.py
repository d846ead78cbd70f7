"""Which share of the work this process does: ranks from torchrun or SLURM, array tasks for caching.

One process per GPU (or per CPU worker). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT itself; a SLURM job with several tasks (submitit's `tasks_per_node`, or `srun`) gets
them from submitit's TorchDistributedEnvironment, which reads the SLURM environment. `setup` then
joins torch.distributed's default process group (NCCL on GPU, gloo on CPU): no home-made
communication. A SLURM job array (`sbatch --array=0-31`) has independent tasks, each of which fills
its own latent-cache shards; sweep points of a submitit sweep are also array tasks, so only the
cache uses the array index.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist


def _submitit_job_tasks() -> int:
    """Number of tasks of the submitit job this process runs in (0 when not in one)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 0
    import submitit

    return submitit.JobEnvironment().num_tasks


def setup(device: torch.device) -> torch.device:
    """Join the default process group when launched as several processes; returns this rank's device.

    CPU threads are sized by ddt.threads (affinity mask, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS), not here.
    """
    if "WORLD_SIZE" not in os.environ and _submitit_job_tasks() > 1:
        import submitit

        # MASTER_ADDR = first node of the job, MASTER_PORT derived from the job id (same on every task)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return device


def teardown() -> None:
    """Leave the process group joined by `setup` (a local sweep runs several jobs in one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: the process group's, else torchrun's or srun's; (0, 1) alone."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (itself without a process group)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)  # SUM: gloo has no AVG
    return value / dist.get_world_size()


def max_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of a tensor over ranks (itself without a process group)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def rank_rows(draw: Callable[..., torch.Tensor], shape: tuple[int, ...], generator: torch.Generator,
              shard: tuple[int, int] = (0, 1), **kwargs) -> torch.Tensor:
    """`draw` (torch.randn/rand) for this rank's rows of a global batch, the numbers one process gets.

    Every rank draws the whole batch from its (identically seeded) generator and keeps rows
    rank::world_size, the rows ddt.data.order gives it, so a run's random numbers, and hence its
    loss and gradients, do not depend on the number of processes.
    """
    rank, world_size = shard
    return draw((shape[0] * world_size, *shape[1:]), generator=generator, **kwargs)[rank::world_size]


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
