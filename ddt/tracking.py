"""Experiment trackers behind one small interface (`log`, `summary`, `finish`)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class NullTracker:
    """logger=none: training metrics go to the console log every `train.log_every` steps."""

    def log(self, metrics: dict, step: int) -> None:
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def make_tracker(logger_cfg: dict) -> NullTracker:
    """The tracker named by `logger.backend`."""
    if logger_cfg["backend"] == "none":
        return NullTracker()
    raise ValueError(f"logger.backend={logger_cfg['backend']!r} is not available; use logger=none")
