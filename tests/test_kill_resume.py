"""kill -9 at random points of a training run, then the same command again: bit-equal final weights."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT, launch
from ddt import checkpoint

ARGS = ["stage=train", "train.max_steps=30", "train.batch_size=16", "train.ckpt_every=1", "train.log_every=10",
        "progress=false"]


def start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *ARGS, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def saved_step(run_dir: Path) -> int | None:
    last = run_dir / "checkpoints" / "last.pt"
    return int(checkpoint.load(last)["step"]) if last.exists() else None


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_kill_9_at_random_points_then_rerun_gives_bit_equal_weights(tmp_path, cache_dir):
    launch(*ARGS, f"hydra.run.dir={tmp_path / 'straight'}")
    run_dir, rng, trials = tmp_path / "killed", random.Random(0), []
    ckpt_dir = run_dir / "checkpoints"
    for trial in range(4):
        proc = start(run_dir)
        # Wait until training runs, then kill at a random moment; the last trial kills while a
        # checkpoint is being written (its temp file exists), the moment a non-atomic write would tear.
        before = saved_step(run_dir) or 0
        assert wait_until(lambda: (saved_step(run_dir) or 0) > before, proc), "training did not advance"
        if trial < 3:
            time.sleep(rng.uniform(0.0, 1.5))
            during_write = False
        else:
            during_write = wait_until(lambda: any(ckpt_dir.glob(".last.pt.*.tmp")), proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        step = saved_step(run_dir)  # loads: a kill never leaves a torn last.pt
        assert step is not None and 0 < step < 30, step
        trials.append((step, during_write))
    assert trials[-1][1], "the last kill did not land during a checkpoint write"
    assert len({s for s, _ in trials}) > 1  # different points of the run
    launch(*ARGS, f"hydra.run.dir={run_dir}")
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(ckpt_dir / "last.pt")
    assert a["step"] == b["step"] == 30
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(b[part][k], v), (part, k)
    assert torch.equal(a["generator"], b["generator"])
    assert not list(ckpt_dir.glob(".*.tmp"))  # temp files of killed writes are cleaned up
    print("kill -9 trials (step in last.pt, during a write):", trials)


def test_an_unreadable_last_pt_resumes_from_the_newest_readable_kept_checkpoint(tmp_path, cache_dir):
    """last.pt and the newer kept step_4.pt cut short (a full disk, a copy killed halfway): the run resumes from
    step_2.pt with one line naming both, to the weights of a run resumed from step_2.pt copied to last.pt by hand."""
    args = ["stage=train", "train.batch_size=16", "train.ckpt_every=1", "train.keep_every=2", "train.log_every=10",
            "progress=false"]
    damaged, by_hand = tmp_path / "damaged", tmp_path / "by_hand"
    launch(*args, "train.max_steps=5", f"hydra.run.dir={damaged}")
    shutil.copytree(damaged, by_hand)
    for name in ("last.pt", "step_4.pt"):
        data = (damaged / "checkpoints" / name).read_bytes()
        (damaged / "checkpoints" / name).write_bytes(data[: len(data) // 2])
    shutil.copy(by_hand / "checkpoints" / "step_2.pt", by_hand / "checkpoints" / "last.pt")
    proc = launch(*args, "train.max_steps=7", f"hydra.run.dir={damaged}")
    (line,) = [line for line in proc.stderr.splitlines() if "last.pt is unreadable" in line]
    assert f"{damaged / 'checkpoints' / 'last.pt'} is unreadable" in line, line
    assert f"resuming from {damaged / 'checkpoints' / 'step_2.pt'}, the newest readable kept checkpoint" in line
    launch(*args, "train.max_steps=7", f"hydra.run.dir={by_hand}")
    resumed, copied = (checkpoint.load(d / "checkpoints" / "last.pt") for d in (damaged, by_hand))
    assert resumed["step"] == copied["step"] == 7
    for part in ("model", "ema"):
        for key, value in copied[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
