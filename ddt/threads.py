"""How many threads torch computes with: the CPUs this process may use, not every core of the machine.

torch starts one thread per core of the machine. A job given fewer (a CPU affinity mask: taskset,
cgroups, a SLURM task with cpus_per_task) then runs more threads than it has cores, and each step waits
for threads that have no core to run on: on a busy machine many times slower than a fair share explains.
OMP_NUM_THREADS, when set, is the user's choice and wins.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch

log = logging.getLogger("ddt.runner")


def thread_count(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """The threads torch should use and why: OMP_NUM_THREADS, else the affinity mask and SLURM_CPUS_PER_TASK (the smaller)."""
    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "")
    first = omp.split(",")[0].strip()  # OpenMP also accepts a list, one count per nesting level
    if first.isdigit() and int(first) > 0:
        return int(first), f"OMP_NUM_THREADS={omp}"
    try:
        cpus = len(os.sched_getaffinity(0))
        reasons = [f"{cpus} CPUs in this process's affinity mask"]
    except AttributeError:  # no affinity masks on this OS (macOS): every core
        cpus = os.cpu_count() or 1
        reasons = [f"{cpus} cores"]
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
        reasons.append(f"SLURM_CPUS_PER_TASK={slurm}")
    ignored = f"; OMP_NUM_THREADS={omp!r} is not a positive number, ignored" if omp else ""
    return cpus, ", ".join(reasons) + ignored


def size_threads() -> int:
    """Set torch's threads to what this process may use, say so in one line, and warn when the machine is busy."""
    threads, why = thread_count()
    torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    log.info("torch uses %d threads on %d cores (%s)", threads, cores, why)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:  # every thread then waits for a core: on a shared CPU one thread per job is far faster
        log.warning("the machine's load (%.1f) is above its %d cores: other jobs compete for them; consider "
                    "OMP_NUM_THREADS=1 (docs/running.md, Threads)", load, cores)
    return threads
