"""Progress reporting: tqdm on a terminal, readable log lines without one (SLURM, CI, nohup)."""
import io
import logging
import re
import sys

import pytest
import torch
from tqdm import tqdm

from conftest import launch
from ddt import progress as progress_module
from ddt.progress import LogLines, format_duration, format_rate, is_terminal, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stderr(monkeypatch):
    """Replace sys.stderr by a terminal or not; call it in the test body, after pytest's own capture began."""
    def install(tty: bool) -> io.StringIO:
        stream = Terminal() if tty else io.StringIO()  # StringIO: isatty() is False, as under SLURM or nohup
        monkeypatch.setattr(sys, "stderr", stream)
        return stream
    return install


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ddt.progress"]


def test_log_lines_without_terminal(stderr, caplog):
    no_terminal = stderr(tty=False)
    caplog.set_level(logging.INFO, logger="ddt.progress")
    clock = Clock()
    with progress(100, "train", "step", clock=clock) as bar:
        assert isinstance(bar, LogLines)
        for step in range(1, 101):
            clock.now += 0.5
            bar.update(1)
            if step == 40:
                bar.set_postfix(loss="0.1234")
    out = lines(caplog)
    assert out[0] == "train: 0/100 step (0%)"
    assert "train: 50/100 step (50%), 2.0 step/s, ETA 25s, loss=0.1234" in out
    assert out[-1] == "train: 100/100 step (100%), 2.0 step/s, took 50s, loss=0.1234"
    assert len(out) == 1 + 19 + 1  # start, every 5% before the end, the end
    assert all("\r" not in line for line in out)
    assert no_terminal.getvalue() == ""  # no bar drawn


def test_a_line_every_minute_when_five_percent_takes_longer(stderr, caplog):
    stderr(tty=False)
    caplog.set_level(logging.INFO, logger="ddt.progress")
    clock = Clock()
    bar = progress(1000, "sample", "img", clock=clock)
    clock.now += 59
    bar.update(1)
    assert len(lines(caplog)) == 1  # only the start line: neither 5% nor a minute yet
    clock.now += 2
    bar.update(1)
    assert lines(caplog)[-1] == "sample: 2/1000 img (0%), 30.5 s/img, ETA 8h27m"
    clock.now += 30
    bar.update(1)
    assert len(lines(caplog)) == 2
    bar.close()
    bar.close()  # idempotent
    assert len(lines(caplog)) == 3


def test_rate_after_resume_counts_this_session_only(stderr, caplog):
    stderr(tty=False)
    caplog.set_level(logging.INFO, logger="ddt.progress")
    clock = Clock()
    bar = progress(200, "train", "step", initial=100, clock=clock)
    clock.now += 10
    bar.update(10)
    bar.close()
    first, middle, last = lines(caplog)
    assert first == "train: 100/200 step (50%)"
    assert middle == "train: 110/200 step (55%), 1.0 step/s, ETA 1m30s"
    assert last == "train: 110/200 step (55%), 1.0 step/s, took 10s"


def test_terminal_draws_tqdm(stderr, caplog):
    terminal = stderr(tty=True)
    caplog.set_level(logging.INFO, logger="ddt.progress")
    assert is_terminal()
    with progress(4, "sample", "img") as bar:
        assert isinstance(bar, tqdm)
        bar.update(4)
        bar.set_postfix(loss="0.5")
    assert "\r" in terminal.getvalue() and "sample" in terminal.getvalue()
    assert lines(caplog) == []


@pytest.mark.parametrize("tty", [True, False])
def test_disabled_is_silent(tty, stderr, caplog):
    caplog.set_level(logging.INFO, logger="ddt.progress")
    fake = stderr(tty)
    with progress(4, "train", "step", enabled=False) as bar:
        bar.update(4)
        bar.set_postfix(loss=1.0)
    assert fake.getvalue() == "" and lines(caplog) == []


def test_closed_or_missing_stderr_is_no_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)
    assert not is_terminal()
    closed = io.StringIO()
    closed.close()  # isatty() raises ValueError
    monkeypatch.setattr(sys, "stderr", closed)
    assert not is_terminal()


def test_formats():
    assert [format_duration(s) for s in (0, 45.4, 108, 3599.6, 7380)] == ["0s", "45s", "1m48s", "1h00m", "2h03m"]
    assert format_rate(35.24, "step") == "35.2 step/s"
    assert format_rate(0.25, "img") == "4.0 s/img"
    assert progress_module.LOG_SECONDS == 60 and progress_module.LOG_FRACTION == 0.05


@pytest.mark.parametrize("tty", [True, False])
def test_torch_fidelity_bars_only_on_a_terminal(tty, stderr, monkeypatch, tmp_path):
    """FD-DINOv2 still goes through torch-fidelity, whose bars would garble a log."""
    import torch_fidelity

    from ddt.metrics import fd_dinov2

    stderr(tty)
    seen = {}

    def fake_metrics(**kwargs):
        seen.update(kwargs)
        return {"frechet_inception_distance": 1.0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake_metrics)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")  # hashed for the reference cache's key
    fd_dinov2(images, images, model="dinov2-vit-s-14", weights_path=weights, cache_dir=tmp_path, verbose=True)
    assert seen["verbose"] is tty
    fd_dinov2(images, images, model="dinov2-vit-s-14", weights_path=weights, cache_dir=tmp_path, verbose=False)
    assert seen["verbose"] is False


def test_launch_without_terminal_logs_progress_lines(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = launch("train.max_steps=6", "train.batch_size=16", "train.ckpt_every=3", "eval.num_samples=40",
                  "sampler.num_steps=4", "sampler.batch_size=20", f"hydra.run.dir={run_dir}")
    output = proc.stdout + proc.stderr  # pipes, not a terminal
    assert "\r" not in output
    # the rate's format, not the machine's speed: below one per second it reads "s/step"
    assert "train: 6/6 step (100%)" in output and re.search(r"[\d.]+ (step/s|s/step)", output)
    assert "sample: 40/40 img (100%)" in output and re.search(r"[\d.]+ (img/s|s/img)", output)
    log = (run_dir / "launch.log").read_text()
    assert "train: 0/6 step (0%)" in log and "train: 6/6 step (100%)" in log
