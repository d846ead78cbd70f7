"""A run folder has one owner (ddt.lock): a live owner refuses everyone else, a gone one is taken over."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddt import checkpoint, lock
from ddt.errors import UsageError
from ddt.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def write_owner(run_dir, **fields) -> None:
    record = {"host": socket.gethostname(), "pid": 1, "pid_start": None, "slurm_job_id": None,
              "started": "2026-01-01T00:00:00Z", "heartbeat_unix": time.time(), **fields}
    atomic_write_json(record, run_dir / lock.OWNER)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_hold_names_this_process_beats_and_is_given_up(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.2)
    hold = lock.Hold(tmp_path).take()
    first = json.loads((tmp_path / "owner.json").read_text())
    assert first["host"] == socket.gethostname() and first["pid"] == lock.os.getpid()
    assert first["pid_start"] == lock.process_start(lock.os.getpid())
    time.sleep(0.7)
    assert json.loads((tmp_path / "owner.json").read_text())["heartbeat_unix"] > first["heartbeat_unix"]
    assert lock.live_owner(tmp_path) is None  # this process is no other owner
    hold.give_up()
    assert not (tmp_path / "owner.json").exists()


def test_a_live_owner_on_this_host_refuses_with_one_line_naming_it(tmp_path, sleeper):
    write_owner(tmp_path, pid=sleeper.pid, pid_start=lock.process_start(sleeper.pid))
    before = (tmp_path / "owner.json").read_bytes()
    assert lock.live_owner(tmp_path)["pid"] == sleeper.pid
    with pytest.raises(UsageError) as err:
        lock.Hold(tmp_path).take()
    assert len(err.value.problems) == 1 and f"process {sleeper.pid} on {socket.gethostname()}" in str(err.value)
    assert "nothing was written" in str(err.value)
    assert (tmp_path / "owner.json").read_bytes() == before


def test_an_owner_killed_with_sigkill_is_taken_over_with_a_line(tmp_path, sleeper, caplog):
    write_owner(tmp_path, pid=sleeper.pid, pid_start=lock.process_start(sleeper.pid))
    sleeper.kill()
    sleeper.wait()
    with caplog.at_level(logging.WARNING, logger="ddt.lock"):
        hold = lock.Hold(tmp_path).take()
    assert f"taking over the run folder from process {sleeper.pid}" in caplog.text and "is gone" in caplog.text
    assert json.loads((tmp_path / "owner.json").read_text())["pid"] == lock.os.getpid()
    hold.give_up()


def test_a_reused_pid_is_not_the_owner(tmp_path, sleeper):
    write_owner(tmp_path, pid=sleeper.pid, pid_start="1")  # the pid, but a process started at another time
    assert lock.gone_because(json.loads((tmp_path / "owner.json").read_text())).endswith(
        "(the pid now belongs to another process)")
    assert lock.live_owner(tmp_path) is None


def test_another_host_is_alive_while_it_beats_and_gone_after_the_stale_limit(tmp_path):
    write_owner(tmp_path, host="node-7", pid=4242, heartbeat_unix=time.time() - 10)
    assert lock.live_owner(tmp_path)["host"] == "node-7"
    with pytest.raises(UsageError, match="process 4242 on node-7"):
        lock.Hold(tmp_path).take()
    write_owner(tmp_path, host="node-7", pid=4242, heartbeat_unix=time.time() - lock.STALE_AFTER_S - 60)
    assert "no heartbeat from node-7 for 6 min" in lock.gone_because(json.loads((tmp_path / "owner.json").read_text()))
    lock.Hold(tmp_path).take().give_up()


def test_a_requeued_slurm_job_owns_the_folder_of_its_earlier_attempt(tmp_path, monkeypatch):
    write_owner(tmp_path, host="node-7", pid=4242, slurm_job_id="77_3")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert lock.live_owner(tmp_path) is None
    hold = lock.Hold(tmp_path).take()
    assert json.loads((tmp_path / "owner.json").read_text())["host"] == socket.gethostname()
    hold.give_up()


def test_only_one_of_two_claims_creates_the_owner_file(tmp_path):
    first, second = lock.Hold(tmp_path), lock.Hold(tmp_path)
    first.record = second.record = lock.this_process()
    assert first._claim() is True and second._claim() is False
    assert list(tmp_path.iterdir()) == [tmp_path / "owner.json"]  # no temp file left behind


def test_an_unreadable_owner_file_leaves_the_folder_unowned(tmp_path, caplog):
    (tmp_path / "owner.json").write_text("{trunc")
    with caplog.at_level(logging.WARNING, logger="ddt.lock"):
        assert lock.live_owner(tmp_path) is None
    assert "owner.json is unreadable" in caplog.text


LIVE = ["train.max_steps=30", "train.batch_size=8", "train.ckpt_every=10", "eval.num_samples=20",
        "sampler.num_steps=2", "sampler.batch_size=20", "progress=false"]


def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), *args]


def test_commands_aimed_at_a_live_run_touch_nothing_of_it(tmp_path):
    """The user's case (issue 41): while a run trains, a refused command and a valid duplicate aimed at its folder
    stop with one line naming the live run; the live run's files come out as those of a run left alone."""
    live, alone = tmp_path / "live", tmp_path / "alone"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(launch_cmd(*LIVE, f"hydra.run.dir={live}"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (live / "ledger.json").exists() or '"training"' not in (live / "ledger.json").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGSTOP)  # held mid-training while the intruders run, however fast the machine
    try:
        intruders = [subprocess.run(launch_cmd(*LIVE, *extra, f"hydra.run.dir={live}"), cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
                     for extra in (["device=cuda"], [])]  # refused anyway (no GPU here), and the very same command
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    for intruder in intruders:
        assert intruder.returncode == 2, intruder.stderr[-2000:]
        lines = intruder.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{live} belongs to a live run (process {proc.pid} on" in lines[0], lines
    subprocess.run(launch_cmd(*LIVE, f"hydra.run.dir={alone}"), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "sample_grid.png", "samples/samples.npz"):
        assert (live / name).read_bytes() == (alone / name).read_bytes(), name
    for name in ("checkpoints/last.pt",):
        a, b = (checkpoint.load(d / name) for d in (live, alone))  # the suite's safe loader
        assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"]) and a["step"] == b["step"], name
    results = [json.loads((d / "results.json").read_text()) for d in (live, alone)]
    assert results[0]["status"] == "completed" and results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["config"] == results[1]["config"]
    states = [[e["state"] for e in json.loads((d / "ledger.json").read_text())["events"]] for d in (live, alone)]
    assert states[0] == states[1] and "failed" not in states[0]
    assert "ERROR" not in (live / "launch.log").read_text()
    assert not (live / "owner.json").exists() and not (alone / "owner.json").exists()  # given up at the end
