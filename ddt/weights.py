"""The weights a run starts from or samples: loaded, and checked before any work.

Suite checkpoints (ddt.train) and official DDT checkpoints (Lightning files or state dicts) are both
read; every mismatch with the configured model or REPA projector is one line naming the keys to set.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ddt import checkpoint
from ddt.config import build_network, check_ckpt
from ddt.errors import UsageError
from ddt.models import DDT
from ddt.models.repa import describe_widths, projector_widths
from ddt.objective import Objective

log = logging.getLogger("ddt.runner")


def load_weights(model: DDT, path: Path, ema: bool = True) -> int | None:
    """Load the EMA (or raw) weights of a suite or an official (Lightning) checkpoint; returns its step."""
    state = checkpoint.load(path)
    problems = fit_problems(state, model, path)
    if problems:
        raise UsageError(problems)
    if "ema" in state and "signature" in state:
        model.load_state_dict(state["ema" if ema else "model"])
        return int(state["step"])
    model.load_state_dict(checkpoint.official_denoiser_state_dict(state, prefer_ema=ema))
    return None


def fit_problems(state: dict, model: DDT, path: Path) -> list[str]:
    """Why a checkpoint's weights do not fit the configured model (empty when they do), naming the keys."""
    if not isinstance(state, dict):
        return [f"{path} is not a state dict or a Lightning checkpoint; point ckpt= at a suite or official checkpoint"]
    if "ema" in state and "signature" in state:
        diff = model.config_mismatch(state["signature"])
        return [f"{path} does not fit the configured model ({'; '.join(diff)}); set those keys or use "
                f"another run directory"] if diff else []
    weights = checkpoint.official_denoiser_state_dict(state)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = [f"{k}: checkpoint {tuple(v.shape)}, config {expected[k]}" for k, v in weights.items()
              if k in expected and tuple(v.shape) != expected[k]]
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if not (shapes or missing or unexpected):
        return []
    detail = "; ".join([*shapes[:3], *([f"{len(missing)} tensors missing, e.g. {missing[0]}"] if missing else []),
                        *([f"{len(unexpected)} unexpected, e.g. {unexpected[0]}"] if unexpected else [])])
    return [f"{path} does not fit the configured model ({len(shapes)} tensors differ in shape: {detail}); "
            f"set the model.* keys it was trained with (e.g. model=ddt_xl model.encoder_depth=22)"]


def weights_problems(plain: dict, todo: list[str], run_dir: Path) -> list[str]:
    """The checkpoints the stages will read: present, readable and fitting the configured model."""
    problems = list(check_ckpt(plain))
    if problems:
        return problems
    ckpt, last = ckpt_path(plain), run_dir / "checkpoints" / "last.pt"
    sources = [resume_checkpoint(run_dir)] if "train" in todo and last.exists() else []
    if ckpt and ("train" not in todo or not last.exists()):
        sources.append(ckpt)
    if "sample" in todo and "train" not in todo and not ckpt:
        if last.exists():
            sources.append(last)
        else:
            problems.append(f"no weights to sample from: no ckpt= was given and {last} does not exist; pass "
                            f"ckpt=PATH or add train to stage (stage=[train,sample,evaluate])")
    if not sources:
        return problems
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_network(plain)
    for path in sources:
        try:
            problems += fit_problems(checkpoint.load(path, mmap=True), model, path)
        except UsageError as err:
            problems += err.problems
    return problems


def training_start(plain: dict, run_dir: Path) -> Path | None:
    """The checkpoint training starts from: resume_checkpoint when resuming, else ckpt= (None: scratch)."""
    last = run_dir / "checkpoints" / "last.pt"
    return resume_checkpoint(run_dir) if last.exists() else ckpt_path(plain)


def resume_checkpoint(run_dir: Path, say: bool = False) -> Path:
    """checkpoints/last.pt, or when it is unreadable (truncated) the newest readable kept step_N.pt (say: log both)."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not last.exists() or _readable(last):
        return last
    kept = sorted((int(m.group(1)), p) for p in last.parent.glob("step_*.pt")
                  if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))
    newest = next((p for _, p in reversed(kept) if _readable(p)), None)
    if newest is None:
        return last  # nothing to fall back on: weights_problems names last.pt as unreadable
    if say:
        log.warning("%s is unreadable (truncated?): resuming from %s, the newest readable kept checkpoint; "
                    "last.pt is replaced at the next checkpoint", last, newest)
    return newest


def _readable(path: Path) -> bool:
    try:
        checkpoint.load(path, mmap=True)  # the archive's index and pickle: a truncated file fails here
    except UsageError:
        return False
    return True


def projector_problems(plain: dict, todo: list[str], run_dir: Path, objective: Objective | None) -> list[str]:
    """A REPA projector that training would load (resume or ckpt=) but that does not fit the configured one."""
    source = training_start(plain, run_dir) if "train" in todo else None
    if source is None or objective is None or objective.repa is None:
        return []
    state = checkpoint.projector_state_dict(checkpoint.load(source, mmap=True))
    if not state:  # fine-tuning (ckpt=) from a model trained without REPA starts a fresh projector
        return [] if not (run_dir / "checkpoints" / "last.pt").exists() else [
            f"{source} was trained without REPA (it holds no projector) but repa is on; resume it with repa=off "
            f"or use another run directory"]
    have, want = projector_widths(state), objective.repa.widths
    if have == want:
        return []
    fix = [f"set repa.projector_dim={have[1]} to load it"] if have[1:3] != want[1:3] else []
    if have[3] != want[3]:
        fix.append(f"use the repa.target_encoder of {have[3]}-d tokens it was trained with")
    return [f"{source} holds a REPA projector of hidden width {have[1]} ({describe_widths(have)}) but "
            f"repa.projector_dim={plain['repa']['projector_dim']} builds {describe_widths(want)}; {' and '.join(fix)} "
            f"(or start from another checkpoint or run directory)"]


def load_projector(objective: Objective | None, path: Path) -> None:
    """Start the REPA projector from a checkpoint's (fine-tuning with ckpt=); widths checked up front."""
    if objective is None or objective.repa is None:
        return
    state = checkpoint.projector_state_dict(checkpoint.load(path))
    if not state:
        log.info("%s holds no REPA projector (trained without REPA): the projector starts from scratch", path)
        return
    objective.load_trainable_state_dict(state)
    log.info("REPA projector (%s) loaded from %s", describe_widths(objective.repa.widths), path)


def ckpt_path(plain: dict) -> Path | None:
    """The `ckpt` key as a path (None when unset)."""
    return Path(plain["ckpt"]).expanduser() if plain["ckpt"] else None
