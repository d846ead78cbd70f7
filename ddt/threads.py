"""How many threads torch computes with: the CPUs this process may use, not every core of the machine.

torch starts one thread per core of the machine. A job given fewer (a CPU affinity mask: taskset,
cgroups, a SLURM task with cpus_per_task) then runs more threads than it has cores, and each step waits
for threads that have no core to run on: on a busy machine many times slower than a fair share explains.
OMP_NUM_THREADS, when set, is the user's choice and wins. Otherwise, once training runs, the Governor
lowers the count while other processes keep some of those CPUs busy and raises it again when they leave,
but only where a training step's gradients come out the same bits with 1 thread as with all (checked on
the first batch), so that a run's numbers never depend on the load.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
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


def size_threads(adapt_to_load: bool = True) -> int:
    """Set torch's threads to what this process may use, say so in one line, and (unless OMP_NUM_THREADS chose
    them) let the governor follow the load from then on."""
    global GOVERNOR
    threads, why = thread_count()
    torch.set_num_threads(threads)
    chosen = why.startswith("OMP_NUM_THREADS")
    GOVERNOR = Governor(threads) if adapt_to_load and not chosen and threads > 1 and Path("/proc/stat").exists() \
        else None
    cores = os.cpu_count() or 1
    log.info("torch uses %d threads on %d cores (%s)", threads, cores, why)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores and GOVERNOR is None:  # every thread then waits for a core
        log.warning("the machine's load (%.1f) is above its %d cores: other jobs compete for them; consider "
                    "OMP_NUM_THREADS=1 (docs/running.md, Threads)", load, cores)
    return threads


def _busy_and_own(cpus: set[int]) -> tuple[float, float, float]:
    """(monotonic seconds, busy CPU-seconds of `cpus` from /proc/stat, this process's CPU-seconds)."""
    busy = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
                busy += user + nice + system + irq + softirq + steal
    own = os.times()
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


class Governor:
    """Re-sizes torch's threads between steps to the CPUs that other processes leave this one.

    A run's threads wait for each other at every parallel region: when another process keeps one of
    its CPUs busy, a run with a thread per CPU spends most of each step waiting for a descheduled thread
    (2 threads beside a second 2-thread process: 0.16x its speed alone on a 2-core EPYC). Every
    `window_s` it compares the CPUs' busy time with its own; two windows in a row agreeing on another
    count change it, and it says so in one line.
    """

    def __init__(self, allowed: int, window_s: float = 1.0):
        self.cpus = os.sched_getaffinity(0)
        self.allowed, self.window_s, self.pending = allowed, window_s, None
        self.clock = time.monotonic
        self.mark = _busy_and_own(self.cpus)

    def after_step(self) -> None:
        """Called between steps: every window, the thread count the other processes leave room for."""
        if self.clock() - self.mark[0] < self.window_s:
            return
        now = _busy_and_own(self.cpus)
        wall = now[0] - self.mark[0]
        others = max(0.0, (now[1] - self.mark[1]) - (now[2] - self.mark[2])) / wall  # CPUs busy with other work
        self.mark = now
        target = max(1, min(self.allowed, self.allowed - round(others)))
        current = torch.get_num_threads()
        if target == current:
            self.pending = None
        elif self.pending != target:
            self.pending = target  # one window is noise: act on the second
        else:
            self.pending = None
            torch.set_num_threads(target)
            log.info("threads %d -> %d: other processes kept %.1f of this process's %d CPUs busy", current, target,
                     others, self.allowed)


GOVERNOR: Governor | None = None  # set by size_threads when the thread count is the suite's to choose


def adapt() -> None:
    """Between two steps: let the governor re-size the threads (nothing when OMP_NUM_THREADS fixed them)."""
    if GOVERNOR is not None:
        GOVERNOR.after_step()


def keep_bits_or_fix_threads(results) -> None:
    """Keep the governor only if `results()` (a training step's gradients) are the same bits with every thread
    count it may choose: a run must not change its numbers when another process comes or goes."""
    global GOVERNOR
    if GOVERNOR is None or results is None:  # results None: not a single CPU process, the threads stay
        GOVERNOR = None
        return
    current, outputs = torch.get_num_threads(), []
    for n in sorted({1, current}):
        torch.set_num_threads(n)
        outputs.append(results())
    torch.set_num_threads(current)
    if not all(torch.equal(a, b) for a, b in zip(outputs[0], outputs[-1])):
        GOVERNOR = None
        log.info("threads stay at %d: this model's gradients differ in their last bits with 1 thread on this "
                 "CPU, so changing the count under load would change the run's numbers", current)
