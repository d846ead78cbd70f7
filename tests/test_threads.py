"""The thread governor (ddt.threads): fewer threads while other processes hold CPUs, never other numbers."""
from __future__ import annotations

import logging

import pytest
import torch

from ddt import threads
from ddt.data.pixels import ImageTensors
from ddt.models import DDT
from ddt.train import Trainer, TrainConfig


class Clock:
    """Stands for /proc/stat and os.times: each window, `others` CPUs busy with other work beside `own`."""

    def __init__(self):
        self.t = self.busy = self.own = 0.0

    def window(self, others: float, own: float = 1.0) -> None:
        self.t += 1.0
        self.busy += others + own
        self.own += own

    def __call__(self, cpus):
        return self.t, self.busy, self.own


@pytest.fixture
def governor(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(threads, "_busy_and_own", clock)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    gov = threads.Governor(4)
    gov.clock = lambda: clock.t
    yield gov, clock
    torch.set_num_threads(before)


def test_the_governor_follows_other_work_after_two_windows_and_says_so(governor, caplog):
    gov, clock = governor
    with caplog.at_level(logging.INFO, logger="ddt.runner"):
        clock.window(others=2.2)  # two of the four CPUs busy elsewhere
        gov.after_step()
        assert torch.get_num_threads() == 4  # one window is noise
        clock.window(others=1.9)
        gov.after_step()
        assert torch.get_num_threads() == 2
        assert "threads 4 -> 2: other processes kept 1.9 of this process's 4 CPUs busy" in caplog.text
        clock.window(others=5.0)  # more work elsewhere than CPUs: one thread, never none
        gov.after_step()
        clock.window(others=5.0)
        gov.after_step()
        assert torch.get_num_threads() == 1
        clock.window(others=0.2)  # the other work left
        gov.after_step()
        clock.window(others=2.0)  # ... or not: two windows must agree
        gov.after_step()
        assert torch.get_num_threads() == 1
        clock.window(others=0.1)
        gov.after_step()
        clock.window(others=0.3)
        gov.after_step()
        assert torch.get_num_threads() == 4


def test_within_a_window_nothing_is_read(governor):
    gov, clock = governor
    gov.after_step()  # the clock has not moved: no division by a zero window, no change
    assert torch.get_num_threads() == 4


def test_the_governor_stands_down_where_fewer_threads_change_the_bits(monkeypatch, caplog):
    monkeypatch.setattr(threads, "GOVERNOR", object())
    with caplog.at_level(logging.INFO, logger="ddt.runner"):
        threads.keep_bits_or_fix_threads(lambda: [torch.tensor([float(torch.get_num_threads())])])
    if torch.get_num_threads() > 1:
        assert threads.GOVERNOR is None and "threads stay at" in caplog.text
    monkeypatch.setattr(threads, "GOVERNOR", object())
    threads.keep_bits_or_fix_threads(lambda: [torch.ones(3)])  # the same bits with any count: it stays
    assert threads.GOVERNOR is not None
    threads.keep_bits_or_fix_threads(None)  # not a single CPU process
    assert threads.GOVERNOR is None


def test_training_while_the_governor_changes_threads_gives_the_same_weights(tmp_path, monkeypatch):
    """Every step on another thread count (the worst load changes can do) against a fixed count: bit-equal,
    or the governor stood down on the first batch because this CPU's kernels differ."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    def train(run_dir, governor):
        monkeypatch.setattr(threads, "GOVERNOR", governor)
        torch.manual_seed(0)  # the quickstart's network and batch: wide enough for torch to split work over threads
        model = DDT(in_channels=1, patch_size=4, hidden_size=64, num_heads=4, depth=28, encoder_depth=22,
                    num_classes=10)
        g = torch.Generator().manual_seed(1)
        data = ImageTensors(torch.randint(0, 256, (128, 1, 16, 16), generator=g, dtype=torch.uint8),
                            torch.randint(0, 10, (128,), generator=g))
        trainer = Trainer(model, data, TrainConfig(max_steps=6, batch_size=64, ckpt_every=100, log_every=100),
                          run_dir=run_dir, seed=0, progress=False)
        trainer.fit()
        return trainer, threads.GOVERNOR

    class Flip:  # a governor that moves between 1 and 2 threads after every step
        def after_step(self):
            torch.set_num_threads(3 - torch.get_num_threads())

    try:
        fixed, _ = train(tmp_path / "fixed", None)
        flipped, kept = train(tmp_path / "flipped", Flip())
    finally:
        torch.set_num_threads(before)
    same = all(torch.equal(a, b) for a, b in zip(fixed.model.state_dict().values(), flipped.model.state_dict().values()))
    print("governor kept:", kept is not None, "same weights:", same)
    assert same or kept is None
