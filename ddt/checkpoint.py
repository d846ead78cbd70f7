"""Checkpoints: atomic save, safe load (`weights_only=True`), official-checkpoint conversion.

Released DDT checkpoints are PyTorch Lightning files: `state_dict` holds the denoiser under
`denoiser.`, its EMA under `ema_denoiser.` and the REPA projector under
`diffusion_trainer.proj.0.` (our projector's keys without that prefix). Lightning also pickles
objects of its own (hyper-parameters, callbacks); `load` never runs their code: such classes are
replaced by inert placeholders so the tensors can be read.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from ddt.errors import UsageError
from ddt.files import atomic_write_bytes, atomic_write_json, finite, process_umask  # noqa: F401  (checkpoint.* users)

OFFICIAL_PREFIXES = ("ema_denoiser.", "denoiser.")
OFFICIAL_PROJECTOR_PREFIX = "diffusion_trainer.proj.0."


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file and rename, so a crash never leaves a half-written file."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


class _Inert(dict):
    """Stands in for a class a checkpoint pickled (e.g. Lightning's AttributeDict); runs no code."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        self["__state__"] = state


def _inert_globals(path: Path) -> list[tuple[type, str]]:
    """Placeholders for every non-tensor global that a checkpoint refers to."""
    return [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name)
            for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)]


def required_file(value: str, key: str, where_from: str) -> Path:
    """The file a config key names; a missing one fails naming the key and where to get it."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={value} does not exist. {where_from}")
    return path


def load(path: str | Path, mmap: bool = False) -> dict:
    """Load a checkpoint without unpickling arbitrary objects (foreign classes become placeholders).

    mmap=True maps the tensors instead of reading them (a cheap look at a large file).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:  # foreign classes (Lightning's): read the tensors, run nothing
            with torch.serialization.safe_globals(_inert_globals(path)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # not a checkpoint at all, or a corrupt or truncated one
        raise UsageError(unreadable_checkpoint(path, err)) from err


def unreadable_checkpoint(path: Path, err: Exception) -> str:
    """Why torch.load failed, in words: not a checkpoint file at all, or a damaged one (the file is the user's: keep it)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save: a zip archive (a pickle before 1.6)
        return (f"{path} is not a checkpoint (not a file torch.save wrote); point ckpt= at a .pt file, "
                f"e.g. RUN_DIR/checkpoints/last.pt or a converted official checkpoint")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (f"{path} is not a readable checkpoint ({reason}): it may be truncated or hold objects other "
            f"than tensors; point ckpt= at another checkpoint")


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


def official_projector_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The REPA projector of a released Lightning checkpoint, in our key names (empty if absent)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    n = len(OFFICIAL_PROJECTOR_PREFIX)
    return {k[n:]: v for k, v in state_dict.items() if k.startswith(OFFICIAL_PROJECTOR_PREFIX)}


def projector_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The REPA projector of a suite checkpoint (`objective`) or a released Lightning one (empty if none)."""
    if "objective" in state and "signature" in state:
        return dict(state["objective"])
    return official_projector_state_dict(state)


def to_official_lightning(model: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor],
                          projector: Mapping[str, torch.Tensor] | None = None, step: int = 0) -> dict:
    """Our weights in the released checkpoints' layout, for the official code and its tools."""
    state = {**{f"denoiser.{k}": v for k, v in model.items()},
             **{f"ema_denoiser.{k}": v for k, v in ema.items()},
             **{f"{OFFICIAL_PROJECTOR_PREFIX}{k}": v for k, v in (projector or {}).items()}}
    return {"state_dict": state, "global_step": step}
