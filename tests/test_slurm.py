"""Sweeps through the submitit SLURM launcher on a real single-node SLURM (scripts/slurm_localhost.sh).

The fixture brings the cluster up (idempotent; .ci/run already did); if SLURM cannot start, these
tests fail with the script's output: they never skip.
"""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slurm
TINY = ["train.batch_size=16", "train.ckpt_every=2", "eval.num_samples=20", "sampler.num_steps=4",
        "sampler.batch_size=10", "progress=false"]


@pytest.fixture(scope="module")
def slurm():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_localhost.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"SLURM did not come up (scripts/slurm_localhost.sh):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def sweep(*args: str, sweep_dir: Path, name: str) -> subprocess.Popen:
    """`python launch.py -m +cluster=localhost ARGS` as a background process (the launcher blocks)."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "-m", "+cluster=localhost", *args,
           f"hydra.sweep.dir={sweep_dir}", f"hydra.launcher.name={name}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "1"})


def finish(proc: subprocess.Popen, name: str, timeout: float = 900) -> tuple[int, str]:
    """Wait for the launcher; on a timeout or error, cancel its jobs so they do not hold the node."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "-n", name])
    return proc.returncode, out


def runs(sweep_dir: Path) -> dict[str, dict]:
    """results.json of each point, keyed by its run directory name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")}


def job_ids(name: str) -> dict[int, str]:
    """{array index: job id} of the jobs named `name` (squeue while queued or running)."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
    return {int(j.split("_")[1]): j for j in out if "_" in j and "[" not in j}


def sacct_states(job: str) -> list[str]:
    """Every state sacct records for a job, its requeued incarnations included (-D)."""
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job, "-o", "State"], capture_output=True, text=True)
    return out.stdout.split()


def test_sweep_with_a_failing_point_then_rerun(tmp_path, cache_dir, slurm):
    """A sweep with a bad point is refused before anything is submitted; the good points complete, and
    a rerun skips the completed points."""
    name = f"ddt-sweep-{uuid.uuid4().hex[:8]}"
    code, out = finish(sweep("model.encoder_depth=8,16,40", "train.max_steps=4", *TINY, sweep_dir=tmp_path,
                             name=name), name)
    assert code == 2 and "model.encoder_depth=40" in out, out[-3000:]
    assert not list(tmp_path.glob(".submitit/*")) and not runs(tmp_path)  # no job, no point started
    args = ["model.encoder_depth=8,16", "train.max_steps=4", *TINY]
    start = time.perf_counter()
    code, out = finish(sweep(*args, sweep_dir=tmp_path, name=name), name)
    wall = time.perf_counter() - start
    assert code == 0, out[-3000:]
    results = runs(tmp_path)
    by_depth = {r["config"]["model"]["encoder_depth"]: r for r in results.values()}
    assert set(by_depth) == {8, 16}
    for depth in (8, 16):
        r = by_depth[depth]
        assert r["status"] == "completed" and r["metrics"]["fid"] > 0 and r["train"]["step"] == 4
        deadline = time.monotonic() + 60  # slurmdbd records the end a moment after the launcher returns
        while "COMPLETED" not in sacct_states(r["slurm_job_id"]) and time.monotonic() < deadline:
            time.sleep(1)
        assert r["slurm_job_id"] and "COMPLETED" in sacct_states(r["slurm_job_id"])
    assert len(list(tmp_path.glob(".submitit/*"))) == 1  # a fresh submitit folder per launch
    print(f"2-point SLURM sweep wall time {wall:.1f} s")

    stamps = {d: (tmp_path / d / "results.json").stat().st_mtime_ns for d in results}
    code, out = finish(sweep(*args, sweep_dir=tmp_path, name=name), name)
    assert code == 0, out[-3000:]
    again = runs(tmp_path)
    for d, r in again.items():
        if r.get("status") == "completed":
            assert (tmp_path / d / "results.json").stat().st_mtime_ns == stamps[d], d  # skipped, untouched
    logs = "".join(p.read_text() for p in tmp_path.glob(".submitit/*/*/*_log.*"))  # the console log is on stderr (.err)
    assert logs.count("is already completed") == 2
    assert len(list(tmp_path.glob(".submitit/*"))) == 2


def wait_for_step(sweep_dir: Path, key: int, step: int, timeout: float = 300) -> Path:
    """The run directory whose config has eval.num_samples == key, once its last.pt reached `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in sweep_dir.iterdir():
            last = d / "checkpoints" / "last.pt"
            try:
                data = json.loads((d / "results.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if data.get("config", {}).get("eval", {}).get("num_samples") == key and last.exists():
                if torch.load(last, weights_only=True, map_location="cpu")["step"] >= step:
                    return d
        time.sleep(0.5)
    raise TimeoutError(f"no run with eval.num_samples={key} reached step {step}")


def test_requeue_and_preemption_signal_resume_to_identical_weights(tmp_path, cache_dir, slurm):
    """Three identical trainings in three run folders (eval.num_samples names a folder but changes nothing
    stage=train computes): one runs through, one is `scontrol requeue`d mid-training, one gets submitit's
    preemption signal (checkpoint, then requeue)."""
    name = f"ddt-requeue-{uuid.uuid4().hex[:8]}"
    steps = 120
    proc = sweep("eval.num_samples=20,21,22", "stage=train", f"train.max_steps={steps}", "train.ckpt_every=10",
                 *[a for a in TINY if not a.startswith(("train.ckpt_every", "eval.num_samples"))], sweep_dir=tmp_path,
                 name=name)
    try:
        requeued = wait_for_step(tmp_path, 21, 20)
        ids = job_ids(name)
        subprocess.run(["scontrol", "requeue", ids[1]], check=True)
        signalled = wait_for_step(tmp_path, 22, 20)
        ids = job_ids(name)
        subprocess.run(["scancel", "--signal", "USR2", ids[2]], check=True)  # what SLURM sends before a limit
        code, out = finish(proc, name)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "-n", name])
    assert code == 0, out[-4000:]
    straight = next(d for d in tmp_path.iterdir() if (d / "results.json").exists() and d not in (requeued, signalled))
    ref = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    assert ref["step"] == steps
    for d, job in ((requeued, ids[1]), (signalled, ids[2])):
        r = json.loads((d / "results.json").read_text())
        assert r["status"] == "completed" and r["train"]["step"] == steps, d
        assert 0 < r["train"]["resumed_from_step"] < steps, r["train"]  # resumed, not restarted
        assert "REQUEUED" in sacct_states(job) or len(sacct_states(job)) > 1, sacct_states(job)
        ledger = json.loads((d / "ledger.json").read_text())  # both incarnations of the job, one id
        assert ledger["slurm_job_ids"] == [job] and [e["state"] for e in ledger["events"]].count("training") >= 2
        got = torch.load(d / "checkpoints" / "last.pt", weights_only=True)
        for part in ("model", "ema"):
            for k, v in ref[part].items():
                assert torch.equal(got[part][k], v), (d.name, part, k)
        print(f"{d.name}: resumed from step {r['train']['resumed_from_step']}, states {sacct_states(job)}")


def detached(*args: str, sweep_dir: Path, name: str) -> tuple[float, subprocess.CompletedProcess]:
    """`python launch.py -m +cluster=localhost_detached ARGS`: seconds until it returned, and its output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "-m", "+cluster=localhost_detached", *args,
                           f"hydra.sweep.dir={sweep_dir}", f"hydra.launcher.name={name}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return time.perf_counter() - start, proc


def status(sweep_dir: Path) -> tuple[int, dict]:
    """`python -m ddt.status SWEEP_DIR --json`: its exit code and parsed output."""
    proc = subprocess.run([sys.executable, "-m", "ddt.status", str(sweep_dir), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout)


def states(sweep_dir: Path) -> dict[str, str]:
    """{encoder depth or run folder: state} of the sweep's points."""
    return {p["run_dir"].split("model.encoder_depth=")[-1].split(",")[0]: p["state"] for p in status(sweep_dir)[1]["points"]}


def wait_for(condition, timeout: float = 600, every: float = 2.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def test_detached_sweep_submit_and_walk_away(tmp_path, cache_dir, slurm):
    """Submit, return at once, see every state, re-issue safely, resubmit only a cancelled point, and read a
    failing point's one-line error, all from `python -m ddt.status`."""
    name = f"ddt-detached-{uuid.uuid4().hex[:8]}"
    args = ["model.encoder_depth=8,16,22", "train.max_steps=40", *TINY]
    try:
        seconds, first = detached(*args, sweep_dir=tmp_path, name=name)
        # returned, its jobs queued or running (until the scheduler's next pass the whole array is one
        # pending entry, ID_[0-2], which job_ids leaves out)
        queued = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert "submitted 3 of 3 point(s)" in first.stdout and queued, first.stdout
        code, now = status(tmp_path)
        assert code == 3 and {p["state"] for p in now["points"]} <= {"pending", "training", "curve", "sampling",
                                                                       "evaluating"}, now
        assert all(p["slurm_job_ids"] for p in now["points"])
        _, again = detached(*args, sweep_dir=tmp_path, name=name)  # while they run: submits nothing
        assert "submitted 0 of 3 point(s)" in again.stdout, again.stdout
        arrays = {j.split("_")[0] for j in subprocess.run(["sacct", "-n", "-X", "--name", name, "-o", "JobID"],
                                                          capture_output=True, text=True).stdout.split()}
        assert len(arrays) == 1, arrays
        subprocess.run(["scancel", f"{next(iter(arrays))}_2"], check=True)  # the 22en6de point
        wait_for(lambda: states(tmp_path).get("22") == "cancelled")
        wait_for(lambda: status(tmp_path)[0] != 3)
        assert states(tmp_path) == {"8": "completed", "16": "completed", "22": "cancelled"}
        _, resubmitted = detached(*args, sweep_dir=tmp_path, name=name)
        assert "submitted 1 of 3 point(s)" in resubmitted.stdout and "model.encoder_depth=22" in resubmitted.stdout.split(
            "submitted      ")[1], resubmitted.stdout
        code, done = wait_for(lambda: (lambda s: s if s[0] != 3 else None)(status(tmp_path)))
        assert code == 0 and {p["state"] for p in done["points"]} == {"completed"}
        for point in done["points"]:
            assert point["step"] == point["max_steps"] == 40 and point["metrics"]["fid"] > 0
        assert len(next(p for p in done["points"] if "encoder_depth=22" in p["run_dir"])["slurm_job_ids"]) == 2
        assert done["totals"]["device_hours_spent"] > 0 and done["totals"]["device_hours_to_go"] == 0
        assert all(0 < p["queued_s"] < p["wall_time_s"] for p in done["points"]), done  # waits told apart

        # a value only the node can judge (the login node checks every file and value it can before submitting)
        _, failing = detached("device=cuda", "train.max_steps=40", *TINY, sweep_dir=tmp_path, name=name)
        wait_for(lambda: "failed" in states(tmp_path).values())
        code, after = status(tmp_path)
        (bad,) = [p for p in after["points"] if p["state"] == "failed"]
        assert code == 1 and "device=cuda but this machine has no CUDA GPU" in bad["error"] and "\n" not in bad["error"]
        assert Path(bad["log"]).exists()
        table = subprocess.run([sys.executable, "-m", "ddt.status", str(tmp_path)], cwd=ROOT, capture_output=True,
                               text=True).stdout
        print(f"detached launch returned in {seconds:.1f} s\n{table}")
        assert "device-hours:" in table and "device=cuda but this machine has no CUDA GPU" in table
    finally:
        subprocess.run(["scancel", "-n", name])
