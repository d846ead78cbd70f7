"""What a run directory says about itself: results.json (numbers) and ledger.json (its states, with times).

Every file here has one writer and is replaced atomically (write a temp file, rename), so a reader (the
status command, a second job, a person with `cat`) never sees half of one:

    run_dir/results.json      the run (rank 0 of its job): config, stage numbers, metrics, curve, cost
    run_dir/ledger.json       the run: each state it entered with time, host, pid and SLURM job id (requeues
                              included), and its training progress (step, max_steps, rate) as it goes
    run_dir/submissions.json  the launcher that submitted it: each submission's time and SLURM job id
    sweep_dir/sweep_points.json   launch.py: every point of the sweeps started in the folder (run dir, overrides)

ddt.status reads them through `read_point`; a state that needs the scheduler to be believed (a job that
vanished while "training") is checked there against SLURM.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ddt.files import atomic_write_json

# The states a run passes through; ddt.status adds not_started, pending and cancelled from outside.
RUNNING_STATES = ("training", "curve", "sampling", "evaluating")
STAGE_STATE = {"cache_latents": "training", "train": "training", "curve": "curve", "sample": "sampling",
               "evaluate": "evaluating"}
LEDGER, SUBMISSIONS, SWEEP_POINTS = "ledger.json", "submissions.json", "sweep_points.json"


def read_json(path: Path) -> dict:
    """A JSON file of a run folder ({} when missing; a file being replaced is read whole or not at all)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


class Results:
    """results.json of a run: read at start (a resumed run keeps earlier stages), rewritten atomically.

    Every rank keeps the numbers; only the writer (rank 0) writes the file.
    """

    def __init__(self, path: Path, writer: bool = True):
        self.path, self.writer = path, writer
        self.data = read_json(path)

    def update(self, **items) -> None:
        """Set items and rewrite the file."""
        self.data.update(items)
        if self.writer:
            atomic_write_json(self.data, self.path)

    def invalidate(self, *keys: str) -> None:
        """Forget results that a newer stage made stale (e.g. metrics of an older checkpoint)."""
        for key in keys:
            self.data.pop(key, None)
        self.update()


def now() -> str:
    """The time as ISO 8601 in UTC, to the second (what every ledger entry carries)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def slurm_job_id() -> str | None:
    """This process's SLURM job id as sacct names it (array jobs as JOB_TASK), None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


class Ledger:
    """ledger.json of a run: the states it entered and its training progress (written by rank 0 only)."""

    def __init__(self, run_dir: Path, writer: bool = True):
        self.path, self.writer = Path(run_dir) / LEDGER, writer
        self.data = read_json(self.path) or {"events": []}
        self._rate_start: tuple[int, float] | None = None

    def enter(self, state: str, **details) -> None:
        """Record that the run entered `state` (with time, host, pid, SLURM job id and any details)."""
        job = slurm_job_id()
        event = {"state": state, "time": now(), "unix_time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                 "slurm_job_id": job, "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), **details}
        self.data["events"].append({k: v for k, v in event.items() if v is not None})
        if job and job not in self.data.setdefault("slurm_job_ids", []):
            self.data["slurm_job_ids"].append(job)
        self._write()

    def progress(self, step: int, max_steps: int) -> None:
        """Record the training step reached and the rate this session measured (steps/s)."""
        clock = time.monotonic()
        if self._rate_start is None:
            self._rate_start = (step, clock)
        first_step, first_clock = self._rate_start
        rate = (step - first_step) / (clock - first_clock) if step > first_step and clock > first_clock else None
        self.data["progress"] = {"step": step, "max_steps": max_steps, "time": now(), "unix_time": time.time(),
                                 **({"steps_per_s": rate} if rate else {})}
        self._write()

    def checkpoint(self, step: int) -> None:
        """Record the step of the checkpoints/last.pt just written: where a stopped run resumes (ddt.status shows it)."""
        self.data["checkpoint"] = {"step": step, "path": "checkpoints/last.pt", "time": now(), "unix_time": time.time()}
        self._write()

    def _write(self) -> None:
        if self.writer:
            atomic_write_json(self.data, self.path)


def record_submission(run_dir: Path, job_id: str, overrides: list[str], max_steps: int | None = None,
                      log: str | None = None) -> None:
    """Append a submission (its SLURM job id, time, host, the run's length and its job log) to submissions.json."""
    path = Path(run_dir) / SUBMISSIONS
    data = read_json(path) or {"submissions": []}
    data["submissions"].append({"slurm_job_id": job_id, "time": now(), "unix_time": time.time(),
                                "host": socket.gethostname(), "overrides": list(overrides), "max_steps": max_steps,
                                "log": log})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(data, path)


def record_sweep_points(sweep_dir: Path, points: dict[Path, list[str]]) -> None:
    """Add the points of a sweep (run dir -> overrides) to sweep_dir/sweep_points.json (kept across launches)."""
    path = Path(sweep_dir) / SWEEP_POINTS
    known = read_json(path).get("points", {})
    known.update({Path(d).name: list(o) for d, o in points.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"points": dict(sorted(known.items()))}, path)


def read_point(run_dir: Path) -> dict:
    """Everything the run folder says about a point: results, ledger and submissions (each {} when missing)."""
    run_dir = Path(run_dir)
    return {"run_dir": str(run_dir), "results": read_json(run_dir / "results.json"),
            "ledger": read_json(run_dir / LEDGER), "submissions": read_json(run_dir / SUBMISSIONS).get("submissions", [])}


def device_hours(results: dict) -> dict:
    """Device-hours per stage of a results.json (wall time x devices held), with the device and their sum.

    Training counts its wall time over every session (resumes included) without its curve points; curve
    points, the final sampling and the evaluation count theirs; every stage holds all of the run's devices.
    """
    device = results.get("device") or {"type": None, "name": None, "count": results.get("world_size") or 1}
    count, hours = device.get("count") or 1, {}
    train = (results.get("train") or {}).get("total_wall_time_s")
    if train is not None:
        hours["train"] = train * count / 3600
    points = [p for p in results.get("curve") or [] if not p.get("final")]
    if points:
        hours["curve"] = sum(p.get("wall_time_s", 0.0) for p in points) * count / 3600
    for stage in ("sample", "evaluate"):
        seconds = (results.get(stage) or {}).get("wall_time_s")
        if seconds is not None:
            hours[stage] = seconds * count / 3600
    return {"device": device.get("name"), "device_type": device.get("type"), "count": count,
            **{k: round(v, 6) for k, v in hours.items()}, "total": round(sum(hours.values()), 6)}
