"""Training loop: flow matching with AdamW, EMA, periodic atomic checkpoints and exact resume.

Resuming from `checkpoints/last.pt` restores model, EMA, optimiser (and REPA projector), the
training RNG and the step; the batch order is a function of (seed, step) (ddt.data.order), so a
resumed run reaches the same weights as an uninterrupted one. Batches are loaded by a DataLoader
(`num_workers` processes) in that fixed order.

Under torch.distributed (ddt.distributed.setup) `train.batch_size` is the global batch: each rank
loads rows rank::world_size of it and draws the same random numbers for them as one process would
(ddt.distributed.rank_rows); DistributedDataParallel averages the gradients of model and REPA
projector, so every rank holds the same weights and only rank 0 writes checkpoints.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ddt import checkpoint, threads
from ddt.distributed import max_over_ranks, mean_over_ranks, process_rank
from ddt.data.order import StepBatches
from ddt.models import compile_model
from ddt.objective import Objective
from ddt.progress import progress as progress_bar
from ddt.errors import UsageError
from ddt.weights import fit_problems


@dataclass
class TrainConfig:
    """The knobs of the `train` config group."""

    max_steps: int
    batch_size: int
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    time_distribution: str = "lognorm"
    label_dropout: float = 0.1
    ckpt_every: int = 10_000
    keep_every: int = 0
    log_every: int = 100
    precision: str = "auto"
    num_workers: int = 0
    compile: bool = False  # ddt.models.compile_model (regional: every block, one graph per block shape)
    activation_checkpointing: bool = False  # recompute block activations in backward (memory for time)


# train.precision=auto on a CPU with bf16 units: bf16 from this model width on. Measured on a 2-core AMX
# Xeon (docs/performance.md, `benchmarks.run --suite precision`): a 28-block DDT trains in bf16 at 0.90x
# fp32 at width 64 with 16 tokens (the quickstart), 1.07-1.38x at width 128, 1.51-1.65x at 256, 1.84x at
# S/2; FID at widths 64 and 128 stayed within the seed spread of fp32.
CPU_BF16_MIN_WIDTH = 128


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16); without them bf16 is emulated."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device, hidden_size: int | None = None) -> torch.dtype | None:
    """The autocast dtype of train.precision: bf16 for `bf16`; for `auto`, bf16 on GPU and on a CPU with bf16
    units for models at least CPU_BF16_MIN_WIDTH wide; None (fp32) otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision={precision!r} must be one of auto, bf16, fp32")
    if precision == "auto":
        wide = hidden_size is not None and hidden_size >= CPU_BF16_MIN_WIDTH
        use_bf16 = device.type == "cuda" or (device.type == "cpu" and wide and cpu_has_bf16_units())
        return torch.bfloat16 if use_bf16 else None
    return torch.bfloat16 if precision == "bf16" else None


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


class _LossModule(nn.Module):
    """Model and objective as one module, so DDP averages the gradients of both (REPA's projector)."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        return self.objective(self.model, batch, generator)


class Trainer:
    """Owns model, EMA, optimiser and RNG; `fit` trains up to max_steps, resuming if possible."""

    def __init__(self, model: nn.Module, dataset: torch.utils.data.Dataset, cfg: TrainConfig, *,
                 run_dir: str | Path, seed: int, objective: Objective | None = None,
                 log: Callable[[dict, int], None] = lambda m, s: None,
                 on_checkpoint: Callable[["Trainer"], None] | None = None, progress: bool = True,
                 on_save: Callable[["Trainer"], None] | None = None,
                 eval_every: int = 0, on_eval: Callable[["Trainer"], None] | None = None):
        self.model, self.dataset, self.cfg = model, dataset, cfg
        self.on_checkpoint = on_checkpoint  # e.g. log a sample grid of the EMA weights (rank 0)
        self.on_save = on_save  # after every write of last.pt, interrupts included (rank 0): e.g. record its step
        # Every eval_every steps before the last, on every rank, after step_N.pt is written: a curve point.
        self.eval_every, self.on_eval = eval_every, on_eval
        self.device = next(model.parameters()).device
        self.objective = objective or Objective(time_distribution=cfg.time_distribution,
                                                label_dropout=cfg.label_dropout)
        self.objective.to(self.device)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        trainable = [p for p in [*model.parameters(), *self.objective.parameters()] if p.requires_grad]
        # Fused: one kernel per step for all parameters (CPU and CUDA) instead of a loop of foreach ops.
        self.optimizer = torch.optim.AdamW(
            trainable, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.seed, self.step = seed, 0
        self.train_seconds = 0.0  # optimisation time over every session of the run (evaluations excluded)
        self.rank, self.world_size = process_rank()
        if cfg.batch_size % self.world_size:
            raise ValueError(f"train.batch_size={cfg.batch_size} (the global batch) is not divisible by the "
                             f"{self.world_size} processes; choose a multiple of {self.world_size}")
        self.objective.shard = (self.rank, self.world_size)
        self.loss_module: nn.Module = _LossModule(model, self.objective)
        if self.world_size > 1:  # frozen parts (VAE, DINOv2) are equal on every rank: no buffer broadcast
            self.loss_module = DistributedDataParallel(
                self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.interrupt: Callable[[], None] | None = None  # set by a signal handler, see fit
        self.ckpt_dir = Path(run_dir) / "checkpoints"
        self.log, self.progress = log, progress
        self.autocast = autocast_dtype(cfg.precision, self.device, getattr(model, "hidden_size", None))
        model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            compile_model(model)  # after the EMA copy: the EMA model is never trained

    # ----------------------------------------------------------------- checkpoints
    @property
    def resolved_precision(self) -> str:
        """What train.precision resolved to here: `bf16` (autocast) or `fp32`."""
        return "bf16" if self.autocast else "fp32"

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step,
                "generator": self.generator.get_state(), "signature": self.model.config,
                "objective": self.objective.trainable_state_dict(), "train_seconds": self.train_seconds,
                "resolved_precision": self.resolved_precision}

    def keeps(self, step: int) -> bool:
        """Whether step_N.pt is kept for this step (train.keep_every, and every curve point)."""
        return bool(self.cfg.keep_every and step % self.cfg.keep_every == 0) or self.eval_due(step)

    def eval_due(self, step: int) -> bool:
        """Whether a curve point is due after this step (the last step is the final evaluation's)."""
        return bool(self.eval_every and step % self.eval_every == 0 and 0 < step < self.cfg.max_steps)

    def save(self) -> Path:
        """Write checkpoints/last.pt (and step_N.pt on cadence) on rank 0."""
        last = self.ckpt_dir / "last.pt"
        if self.rank != 0:
            return last
        for stale in self.ckpt_dir.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        state = self.state_dict()
        checkpoint.atomic_save(state, last)
        if self.keeps(self.step):
            checkpoint.atomic_save(state, self.ckpt_dir / f"step_{self.step}.pt")
        if self.on_save is not None:
            self.on_save(self)
        return last

    def load(self, path: str | Path) -> None:
        """Resume model, EMA, optimiser, RNG and step from a checkpoint written by `save`."""
        path = Path(path)
        state = checkpoint.load(path)
        problems = fit_problems(state, self.model, path)
        if problems:
            raise UsageError(problems)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.objective.load_trainable_state_dict(state.get("objective", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.cfg.precision == "auto" and "resolved_precision" in state:  # a resume on another CPU kind keeps it
            self.autocast = torch.bfloat16 if state["resolved_precision"] == "bf16" else None

    # ----------------------------------------------------------------- the loop
    def _check_finite(self, first_bad_step: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Raise (on every rank together) if some rank saw a non-finite loss or the gradient is not finite."""
        bad_step = int(max_over_ranks(first_bad_step).item())  # one host sync per check, not per step
        if bad_step < 0 and math.isfinite(grad_norm.item()):
            return
        last = self.ckpt_dir / "last.pt"
        where = f"at step {bad_step}" if bad_step >= 0 else f"(max |grad| {grad_norm.item()}) at step {self.step - 1}"
        raise FloatingPointError(
            f"training loss is not finite {where}; the last good checkpoint is "
            f"{last if last.exists() else 'none (no checkpoint written yet)'}. Lower train.lr or check the data.")

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of this rank's share of a batch; leaves the rank-averaged gradients in .grad."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss, terms = self.loss_module(batch, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, terms

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step (forward, backward, AdamW, EMA) without host syncs; returns the loss."""
        loss, terms = self.forward_backward(batch)
        self.optimizer.step()
        update_ema(self.ema, self.model, self.cfg.ema_decay)
        self.step += 1
        threads.adapt()  # between steps: fewer threads while other processes hold some of the CPUs
        return loss, terms

    def _gradients(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One step's gradients, leaving the RNG, the weights and .grad as they were (the threads probe)."""
        state = self.generator.get_state()
        with torch.random.fork_rng(devices=[]):
            self.forward_backward(batch)
        self.generator.set_state(state)
        grads = [p.grad.clone() for p in self.model.parameters() if p.grad is not None]
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def fit(self) -> dict:
        """Train from self.step to cfg.max_steps; returns loss, speed and timing numbers.

        When `self.interrupt` is set (by a preemption signal handler) the loop finishes the current
        step, saves a checkpoint and calls it (submitit's handler requeues the job and exits).
        """
        cfg = self.cfg
        start_step, start, eval_seconds = self.step, time.perf_counter(), 0.0
        last_loss = grad_norm = float("nan")
        last_terms: dict[str, float] = {}
        bar = progress_bar(cfg.max_steps, "train", "step", initial=self.step,
                           enabled=self.progress and self.rank == 0)
        self.model.train()
        order = StepBatches(self.step, cfg.max_steps, cfg.batch_size, len(self.dataset), self.seed,
                            self.rank, self.world_size)
        batches = torch.utils.data.DataLoader(self.dataset, sampler=order, batch_size=None,
                                              num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda")
        # Non-finite losses are flagged on the device (no host sync per step) and checked at every
        # log, checkpoint and interrupt: a checkpoint is never written from non-finite weights.
        first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        resumed_seconds = self.train_seconds
        for batch in batches:
            if self.step == start_step:  # the governor may change the threads only if that keeps the bits
                threads.keep_bits_or_fix_threads(
                    (lambda: self._gradients(batch)) if self.device.type == "cpu" and self.world_size == 1 else None)
            loss, terms = self.train_step(batch)
            bad = ~torch.isfinite(loss.detach())
            first_bad_step = torch.where(bad & (first_bad_step < 0), self.step - 1, first_bad_step)
            bar.update(1)
            eval_due = self.eval_due(self.step) and self.on_eval is not None
            save_due = self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps or self.keeps(self.step)
            checkpoint_due = save_due or self.interrupt is not None
            if self.step % cfg.log_every == 0 or checkpoint_due:
                # max |grad| after DDP's averaging: the same on every rank
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
                self._check_finite(first_bad_step, norm)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                last_loss, grad_norm = mean_over_ranks(loss).item(), norm.item()
                last_terms = {k: mean_over_ranks(v).item() for k, v in terms.items()} if len(terms) > 1 else {}
                bar.set_postfix(loss=f"{last_loss:.4f}")
                elapsed = time.perf_counter() - start - eval_seconds
                self.log({"train/loss": last_loss, "train/grad_norm": grad_norm, "train/lr": cfg.lr,
                          "train/images_per_s": (self.step - start_step) * cfg.batch_size / elapsed,
                          **{f"train/{k}": v for k, v in last_terms.items()}},
                         self.step)
            if save_due:
                self.train_seconds = resumed_seconds + time.perf_counter() - start - eval_seconds
                self.save()
                if self.on_checkpoint is not None and self.rank == 0:
                    self.on_checkpoint(self)
            if eval_due:
                eval_start = time.perf_counter()
                self.on_eval(self)
                eval_seconds += time.perf_counter() - eval_start
            if self.interrupt is not None:
                interrupt, self.interrupt = self.interrupt, None
                self.train_seconds = resumed_seconds + time.perf_counter() - start - eval_seconds
                self.save()
                interrupt()
        bar.close()
        if not (self.ckpt_dir / "last.pt").exists():
            self.save()  # max_steps = 0: the untrained model is still a checkpoint to sample from
        seconds = time.perf_counter() - start - eval_seconds
        self.train_seconds = resumed_seconds + seconds
        steps = self.step - start_step
        return {"step": self.step, "steps_this_session": steps, "resumed_from_step": start_step,
                "final_loss": last_loss, **{f"final_{k}": v for k, v in last_terms.items()},
                "final_grad_norm": grad_norm, "wall_time_s": round(seconds, 3),
                "total_wall_time_s": round(self.train_seconds, 3), "curve_eval_wall_time_s": round(eval_seconds, 3),
                "images_per_s": round(steps * cfg.batch_size / seconds, 2) if steps else None,
                "world_size": self.world_size, "resolved_precision": self.resolved_precision}
