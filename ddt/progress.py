"""Progress of long loops (training steps, sampled images, cached latents): a tqdm bar on a terminal,
plain log lines where no terminal is attached (SLURM, CI, nohup), nothing when disabled.

    with progress(total=5000, desc="train", unit="step", initial=step) as bar:
        for ...:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

Without a terminal the lines go to the `ddt.progress` logger (so Hydra's job log keeps them, and
`logging.getLogger("ddt.progress").setLevel(logging.WARNING)` silences them): one at the start, then
every 5% of the total or every 60 s, whichever comes first, and one at the end, e.g.

    train: 1200/5000 step (24%), 35.2 step/s, ETA 1m48s, loss=0.1234
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Callable, Protocol

LOG = logging.getLogger(__name__)
LOG_FRACTION = 0.05  # a line every 5% of the total ...
LOG_SECONDS = 60.0  # ... or every minute, whichever comes first


class Progress(Protocol):
    """What the loops call; tqdm bars and the log-line and silent reporters below all provide it."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> "Progress": ...

    def __exit__(self, *exc: object) -> Any: ...


def is_terminal() -> bool:
    """Whether stderr is a terminal (where tqdm and torch-fidelity draw their bars)."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """45s, 1m48s, 2h03m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_rate(per_second: float, unit: str) -> str:
    """35.2 step/s, or 4.1 s/img below one per second."""
    return f"{per_second:.1f} {unit}/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{unit}"


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _Silent:
    """Progress disabled: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogLines:
    """Progress as log lines: at the start, every LOG_FRACTION of the total or LOG_SECONDS, at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, *,
                 logger: logging.Logger = LOG, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.logger, self.clock = logger, clock
        self.initial, self.started = initial, clock()
        self.postfix: dict[str, Any] = {}
        self.every = max(1, math.ceil(total * LOG_FRACTION))
        self.closed = False
        self._emit()

    def _emit(self, final: bool = False) -> None:
        self.logged_n, self.logged_at = self.n, self.clock()
        percent = 100 * self.n / self.total if self.total else 100
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit} ({percent:.0f}%)"]
        elapsed = self.logged_at - self.started
        # The rate of this session only: steps done before a resume took no time here.
        done = self.n - self.initial
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(format_rate(rate, self.unit))
            if final:
                parts.append(f"took {format_duration(elapsed)}")
            elif self.n < self.total:
                parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        parts += [f"{k}={_format_value(v)}" for k, v in self.postfix.items()]
        self.logger.info("%s", ", ".join(parts))

    def update(self, n: int = 1) -> None:
        """Count n more; log if a 5% mark was crossed or a minute passed since the last line."""
        self.n += n
        if self.n >= self.total:
            return  # the end is close()'s line, which also has what the caller sets after this update
        if self.n // self.every > self.logged_n // self.every or self.clock() - self.logged_at >= LOG_SECONDS:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        """Values (e.g. loss=...) appended to the following lines."""
        self.postfix = values

    def close(self) -> None:
        """Log the final line (once)."""
        if not self.closed:
            self.closed = True
            self._emit(final=True)

    def __enter__(self) -> "LogLines":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True, *,
             logger: logging.Logger = LOG, clock: Callable[[], float] = time.monotonic) -> Progress:
    """A tqdm bar on a terminal, log lines without one, nothing when not enabled."""
    if not enabled:
        return _Silent()
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit)
    return LogLines(total, desc, unit, initial, logger=logger, clock=clock)
