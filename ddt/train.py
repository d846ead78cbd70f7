"""Training loop: flow matching with AdamW, EMA, periodic atomic checkpoints and exact resume.

Resuming from `checkpoints/last.pt` restores model, EMA, optimiser (and REPA projector), the
training RNG and the step; the batch order is a function of (seed, step) (ddt.data.order), so a
resumed run reaches the same weights as an uninterrupted one. Batches are loaded by a DataLoader
(`num_workers` processes) in that fixed order.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ddt import checkpoint
from ddt.data.order import StepBatches
from ddt.objective import Objective


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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU for `auto`/`bf16`, none for `fp32` or on CPU with `auto`."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision in ("auto", "bf16"):
        return torch.bfloat16
    raise ValueError(f"train.precision={precision!r} must be one of auto, bf16, fp32")


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


# Block options of checkpoints written before they existed: DDT's.
SIGNATURE_DEFAULTS = {"arch": "ddt", "norm": "rmsnorm", "ffn": "swiglu", "pos": "rope", "qk_norm": True}


def model_signature(model: nn.Module) -> dict:
    """The constructor arguments (for ddt.models.build_model) that a checkpoint must match."""
    return {k: getattr(model, k, None) for k in
            ("arch", "in_channels", "patch_size", "hidden_size", "num_heads", "depth", "encoder_depth",
             "num_classes", "norm", "ffn", "pos", "qk_norm")}


def check_signature(saved: dict, model: nn.Module, path: Path) -> None:
    """Fail naming every model.* key on which the checkpoint and the config disagree."""
    current, saved = model_signature(model), {**SIGNATURE_DEFAULTS, **saved}
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} does not match the model config ({detail}); "
                         f"override those keys or use another run directory")


class Trainer:
    """Owns model, EMA, optimiser and RNG; `fit` trains up to max_steps, resuming if possible."""

    def __init__(self, model: nn.Module, dataset: torch.utils.data.Dataset, cfg: TrainConfig, *,
                 run_dir: str | Path, seed: int, objective: Objective | None = None,
                 log: Callable[[dict, int], None] = lambda m, s: None,
                 on_checkpoint: Callable[["Trainer"], None] | None = None, progress: bool = True):
        self.model, self.dataset, self.cfg = model, dataset, cfg
        self.on_checkpoint = on_checkpoint  # e.g. log a sample grid of the EMA weights
        self.device = next(model.parameters()).device
        self.objective = objective or Objective(time_distribution=cfg.time_distribution,
                                                label_dropout=cfg.label_dropout)
        self.objective.to(self.device)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        trainable = [p for p in [*model.parameters(), *self.objective.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda")
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.seed, self.step = seed, 0
        self.ckpt_dir = Path(run_dir) / "checkpoints"
        self.log, self.progress = log, progress
        self.autocast = autocast_dtype(cfg.precision, self.device)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step,
                "generator": self.generator.get_state(), "signature": model_signature(self.model),
                "objective": self.objective.trainable_state_dict()}

    def save(self) -> Path:
        state = self.state_dict()
        last = self.ckpt_dir / "last.pt"
        checkpoint.atomic_save(state, last)
        if self.cfg.keep_every and self.step % self.cfg.keep_every == 0:
            checkpoint.atomic_save(state, self.ckpt_dir / f"step_{self.step}.pt")
        return last

    def load(self, path: str | Path) -> None:
        """Resume model, EMA, optimiser, RNG and step from a checkpoint written by `save`."""
        path = Path(path)
        state = checkpoint.load(path)
        check_signature(state.get("signature", {}), self.model, path)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.objective.load_trainable_state_dict(state.get("objective", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])

    # ----------------------------------------------------------------- the loop
    def fit(self) -> dict:
        """Train from self.step to cfg.max_steps; returns loss, speed and timing numbers."""
        cfg = self.cfg
        start_step, start = self.step, time.perf_counter()
        last_loss = grad_norm = float("nan")
        last_terms: dict[str, float] = {}
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress)
        self.model.train()
        batches = torch.utils.data.DataLoader(
            self.dataset, sampler=StepBatches(self.step, cfg.max_steps, cfg.batch_size, len(self.dataset), self.seed),
            batch_size=None, num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda")
        for batch in batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                enabled=self.autocast is not None):
                loss, terms = self.objective(self.model, batch, self.generator)
            if not math.isfinite(loss.item()):
                last = self.ckpt_dir / "last.pt"
                raise FloatingPointError(
                    f"training loss is {loss.item()} at step {self.step}; the last good checkpoint is "
                    f"{last if last.exists() else 'none (no checkpoint written yet)'}. "
                    f"Lower train.lr or check the data.")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")).item()
            self.optimizer.step()
            update_ema(self.ema, self.model, cfg.ema_decay)
            self.step += 1
            last_loss = loss.item()
            if len(terms) > 1:
                last_terms = {k: v.item() for k, v in terms.items()}
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - start
                self.log({"train/loss": last_loss, "train/grad_norm": grad_norm, "train/lr": cfg.lr,
                          "train/images_per_s": (self.step - start_step) * cfg.batch_size / elapsed,
                          **{f"train/{k}": v for k, v in last_terms.items()}},
                         self.step)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                self.save()
                if self.on_checkpoint is not None:
                    self.on_checkpoint(self)
        bar.close()
        if not (self.ckpt_dir / "last.pt").exists():
            self.save()  # max_steps = 0: the untrained model is still a checkpoint to sample from
        seconds = time.perf_counter() - start
        steps = self.step - start_step
        return {"step": self.step, "steps_this_session": steps, "resumed_from_step": start_step,
                "final_loss": last_loss, **{f"final_{k}": v for k, v in last_terms.items()},
                "final_grad_norm": grad_norm, "wall_time_s": round(seconds, 3),
                "images_per_s": round(steps * cfg.batch_size / seconds, 2) if steps else None}
