"""Checkpoints: atomic save, safe load (`weights_only=True`), official-checkpoint conversion."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

OFFICIAL_PREFIXES = ("ema_denoiser.", "denoiser.")


def atomic_write_bytes(path: str | Path, write_fn) -> None:
    """Call write_fn(file_object) on a temp file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file and rename, so a crash never leaves a half-written file."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write JSON through a temp file and rename."""
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False).encode()))


def load(path: str | Path) -> dict:
    """Load a checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or a pickle of arbitrary objects
        raise RuntimeError(f"cannot load checkpoint {path}: {err}. It may be truncated or not a "
                           f"plain state-dict checkpoint; delete it or point ckpt= at another file") from err


def official_denoiser_state_dict(state_dict: Mapping[str, torch.Tensor],
                                 prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Denoiser weights from an official state dict, bare or a Lightning one with `denoiser.` prefixes."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    prefixes = OFFICIAL_PREFIXES if prefer_ema else OFFICIAL_PREFIXES[::-1]
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if picked:
            return picked
    return dict(state_dict)
