"""Experiment trackers behind one small interface (`log`, `image`, `summary`, `finish`).

`logger=wandb` logs a run to Weights & Biases: the resolved config flattened to dotted keys (so
`model.encoder_depth` is a filterable column), `group` = the study (run name + the time its sweep
folder was first used, kept in `runs/<name>/wandb_group.txt`), `job_type` = the stages, a run id
kept in the run directory (`wandb_id.txt`) so that a resumed or requeued job continues the same
W&B run, and offline files under `<run_dir>/wandb/` (`wandb sync <run_dir>/wandb/offline-run-*`).
W&B never stops training: a failing `init` falls back to offline mode, a failing call is warned
about once and the tracker goes quiet.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class NullTracker:
    """logger=none: training metrics go to the console log every `train.log_every` steps."""

    def log(self, metrics: dict, step: int) -> None:
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def image(self, key: str, image: np.ndarray, step: int, caption: str = "") -> None:
        pass

    def curve(self, point: dict) -> None:
        """One curve point (the EMA weights evaluated at a training step) as `eval/*`."""
        log.info("eval at step %d: %s", point["step"], " ".join(f"{k}={v:.4g}" for k, v in eval_row(point).items()))

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"encoder_depth": 8}} -> {"model.encoder_depth": 8} (lists stay values)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """{"model.encoder_depth": 8} -> {"model": {"encoder_depth": 8}}: flatten's inverse (a logged W&B config)."""
    out: dict = {}
    for name, value in flat.items():
        *groups, key = name.split(".")
        node = out
        for group in groups:
            node = node.setdefault(group, {})
        node[key] = value
    return out


# The ADM evaluator's five (FID, sFID, IS, precision, recall), then KID and FD-DINOv2 (eval.fd_dinov2)
METRICS = ("fid", "sfid", "isc_mean", "precision", "recall", "kid_mean", "fd_dinov2")
CURVE_METRICS = (*METRICS, "isc_std", "kid_std", "f_score", "num_samples")
# Which way is better for each metric (ddt.halving ranks by it): distances low, IS and coverage high.
HIGHER_IS_BETTER = {"fid": False, "sfid": False, "isc_mean": True, "precision": True, "recall": True,
                    "kid_mean": False, "fd_dinov2": False}


def eval_row(point: dict) -> dict[str, float]:
    """A curve point as the `eval/*` values logged against the training step (`eval/step`)."""
    return {"eval/step": point["step"], **{f"eval/{k}": point[k] for k in CURVE_METRICS if k in point}}


def summary_row(results: dict) -> dict[str, Any]:
    """The headline numbers of a results.json, flat: what W&B's run summary and the analysis share."""
    train, sample = results.get("train") or {}, results.get("sample") or {}
    row = {"status": results.get("status"), "step": train.get("step", sample.get("step")),
           "config_id": results.get("config_id")}
    row.update({k: v for k, v in (results.get("metrics") or {}).items() if k in METRICS})
    final = [p for p in results.get("curve") or [] if p.get("final")]
    samples = (results.get("evaluate") or {}).get("num_samples", final[-1].get("num_samples") if final else None)
    if samples is not None:  # the images behind the metrics: FIDs of other counts are not comparable
        row["num_samples"] = samples
    # train.wall_time_s is the last session's; train.total_wall_time_s the run's over every session (resumes)
    for stage, keys in (("train", ("images_per_s", "wall_time_s", "total_wall_time_s", "final_loss")),
                        ("sample", ("images_per_s", "wall_time_s", "num_recompute", "sharing_ratio", "nfe_per_image",
                                    "encoder_passes_per_image", "decoder_passes_per_image"))):
        stats = results.get(stage) or {}
        row.update({f"{stage}.{k}": stats[k] for k in keys if k in stats})
    return row


def _read_or_create(path: Path, make: str) -> str:
    """The first line of `path`, created atomically with `make` if missing (concurrent jobs agree)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        for _ in range(50):  # another job created it a moment ago and may still be writing
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.1)
        raise RuntimeError(f"{path} is empty; delete it to let the next run recreate it")
    with os.fdopen(fd, "w") as f:
        f.write(make + "\n")
    return make


class WandbTracker(NullTracker):
    """A W&B run that survives W&B failures (offline fallback, then silence)."""

    def __init__(self, logger_cfg: dict, *, config: dict, run_dir: Path, sweep_dir: Path, job_type: str):
        import wandb

        self.wandb, self.failed = wandb, False
        run_id = _read_or_create(run_dir / "wandb_id.txt", uuid.uuid4().hex[:12])
        group = logger_cfg.get("group") or _read_or_create(
            sweep_dir / "wandb_group.txt", f"{config['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
        kwargs = dict(project=logger_cfg["project"], entity=logger_cfg.get("entity"), group=group,
                      job_type=job_type, tags=list(logger_cfg.get("tags") or []), id=run_id, resume="allow",
                      name=run_dir.name, dir=str(run_dir), config=flatten(config))
        self.run = None
        try:
            self.run = wandb.init(mode=logger_cfg["mode"], **kwargs)
        except Exception as err:  # no network, bad key, server down: keep the run, log offline
            log.warning("W&B init failed (%s: %s); logging offline to %s/wandb instead "
                        "(upload later with `wandb sync`)", type(err).__name__, err, run_dir)
            try:
                self.run = wandb.init(mode="offline", **kwargs)
            except Exception as err2:
                self.failed = True
                log.warning("W&B offline init failed too (%s: %s); training goes on without W&B",
                            type(err2).__name__, err2)
        if self.run is not None:
            log.info("W&B run %s (group %s, mode %s)", run_id, group, self.run.settings.mode)
            # Curve points are plotted against eval/step, not W&B's own step, so a point filled in
            # later (stage=curve, a resumed run) lands at its training step.
            self._safely(self.run.define_metric, "eval/step")
            self._safely(self.run.define_metric, "eval/*", step_metric="eval/step")

    def _safely(self, fn, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:
            self.failed = True
            log.warning("W&B call failed (%s: %s); training goes on without W&B logging", type(err).__name__, err)

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        self._safely(self.run.log, metrics, step=step)

    def curve(self, point: dict) -> None:
        super().curve(point)
        self._safely(self.run.log, eval_row(point))

    def image(self, key: str, image: np.ndarray, step: int, caption: str = "") -> None:
        self._safely(lambda: self.run.log({key: self.wandb.Image(image, caption=caption)}, step=step))

    def summary(self, metrics: dict) -> None:
        self._safely(self.run.summary.update, metrics)

    def finish(self) -> None:
        self._safely(self.run.finish)


def make_tracker(logger_cfg: dict, *, config: dict | None = None, run_dir: Path | None = None,
                 sweep_dir: Path | None = None, job_type: str = "train") -> NullTracker:
    """The tracker named by `logger.backend`."""
    if logger_cfg["backend"] == "none":
        return NullTracker()
    if logger_cfg["backend"] == "wandb":
        return WandbTracker(logger_cfg, config=config, run_dir=Path(run_dir), sweep_dir=Path(sweep_dir),
                            job_type=job_type)
    raise ValueError(f"logger.backend={logger_cfg['backend']!r} is not available; use logger=none or wandb")
