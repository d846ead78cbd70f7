"""Where a sweep stands, from its run folders alone (and SLURM's accounting where there is one).

    python -m ddt.status runs/ratio              # one row per point, then totals and device-hours
    python -m ddt.status runs/ratio --watch 60   # refresh every 60 s until no point is pending or running
    python -m ddt.status runs/ratio --json       # {"points": [...], "totals": {...}}

Each point's state comes from its ledger (ddt.ledger, written by the run and by the launcher that
submitted it): not_started, pending, training, curve, sampling, evaluating, completed, failed,
interrupted or cancelled; a halving study's point also pruned (cut at a rung, done) or revived (ddt.study). Wall time is the sum over the run's sessions, each from its submission (or first
state) to the state that ended it (completed, failed, interrupted), the time between sessions left out (a run
completed, then extended a week later); `queued` is the part of it spent waiting (each submission or requeue
up to the run's next state). A point whose ledger says it is
running is checked against SLURM (sacct, else squeue) or, without SLURM, against its process on this
host, so a job that vanished (scancel, node failure, time limit, OOM kill) shows as cancelled, failed
or interrupted, not as running forever.
Exit status: 0 every point completed, 3 some point pending or running, 1 otherwise (failed, cancelled,
interrupted or not started, with none running).
"""
from __future__ import annotations

import argparse
import calendar
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ddt.ledger import LEDGER, RUNNING_STATES, SUBMISSIONS, SWEEP_POINTS, device_hours, read_json, read_point

# pruned: cut by a halving study at a rung (ddt.study), done as far as the study goes; revived: a pruned
# configuration the study command will extend again
STATES = ("not_started", "pending", *RUNNING_STATES, "completed", "pruned", "revived", "failed", "interrupted",
          "cancelled")
DONE = ("completed", "pruned")
PRUNED_KEYS = ("rung", "metric", "value", "ci95", "interval", "cut", "rule", "reason", "config_id")
ACTIVE = ("pending", *RUNNING_STATES)
SHOWN_METRICS = ("fid", "sfid", "isc_mean", "precision", "recall")
# SLURM job states (sacct/squeue) and what they mean for a point whose run has not said otherwise
SLURM_WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD")
SLURM_RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING")


def point_dirs(sweep_dir: Path) -> list[Path]:
    """The run folders of a sweep: those it recorded as points, and every folder holding a run's files."""
    sweep_dir = Path(sweep_dir)
    if any((sweep_dir / name).exists() for name in ("results.json", LEDGER, SUBMISSIONS)):
        return [sweep_dir]  # a run folder of its own
    named = {sweep_dir / name for name in read_json(sweep_dir / SWEEP_POINTS).get("points", {})}
    found = {p.parent for name in ("results.json", LEDGER, SUBMISSIONS) for p in sweep_dir.glob(f"*/{name}")}
    return sorted(named | found)


def slurm_states(job_ids: set[str]) -> dict[str, str] | None:
    """{job id: SLURM state} of the given jobs (array tasks as JOB_TASK); None where SLURM cannot be asked."""
    if not job_ids:
        return {}
    if shutil.which("sacct"):
        # the array's own id too: an array's tasks cancelled before they started are one record, 123_[2-5%4],
        # that `-j 123_2` does not find
        asked = job_ids | {j.split("_")[0] for j in job_ids if "_" in j}
        out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted(asked))])
        if out is not None:
            found = _expand({line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line})
            return {**found, **_vanished(job_ids, found)}
    if shutil.which("squeue"):  # no accounting: only jobs still queued or running are known
        out = _run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))])
        if out is not None:
            return _expand({line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line})
    return None


def _vanished(job_ids: set[str], found: dict[str, str]) -> dict[str, str]:
    """Array tasks cancelled while pending that sacct has no record of at all (their range record shrinks as the
    other tasks start): CANCELLED when sacct knows other tasks of the array and squeue does not list the task."""
    bases = {j.split("_")[0] for j in found if "_" in j}
    missing = {j for j in job_ids if "_" in j and j not in found and j.split("_")[0] in bases}
    if not missing or not shutil.which("squeue"):
        return {}
    out = _run(["squeue", "-h", "--me", "-o", "%i|%T"])  # not -j: it fails on a job the controller has forgotten
    if out is None:
        return {}
    queued = _expand({line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line})
    return {j: queued.get(j, "CANCELLED") for j in missing}


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _expand(states: dict[str, str]) -> dict[str, str]:
    """`123_[0-2,5%4]` (array tasks not started yet) as 123_0, 123_1, 123_2, 123_5; `CANCELLED by 0` as CANCELLED.

    A task's own record wins over a range that names it (sacct keeps the range an array was submitted with)."""
    out, ranges = {}, {}
    for job, state in states.items():
        state = state.split()[0] if state else "UNKNOWN"
        ranged = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job)
        if not ranged:
            out[job] = state
            continue
        for part in ranged.group(2).split(","):
            first, _, last = part.partition("-")
            for task in range(int(first), int(last or first) + 1):
                ranges[f"{ranged.group(1)}_{task}"] = state
    return {**ranges, **out}


def _alive(event: dict) -> bool | None:
    """Whether the process that wrote a ledger event still runs (None when it ran on another host)."""
    if event.get("host") != socket.gethostname() or not event.get("pid"):
        return None
    try:
        os.kill(int(event["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _when(entry: dict) -> float:
    """The Unix time of a ledger or submission entry."""
    if "unix_time" in entry:
        return float(entry["unix_time"])
    return float(calendar.timegm(time.strptime(entry["time"], "%Y-%m-%dT%H:%M:%SZ")))


def queued_seconds(submissions: list[dict], events: list[dict], state: str, now: float) -> float | None:
    """Seconds a point waited in the queue: from each submission or requeue to the run's next state.

    None for a point never submitted to a scheduler (a local run starts at once). A submission that
    never started counts up to now while the point is pending, and not at all once it is not (a
    point cancelled while pending has no time it stopped waiting).
    """
    if not submissions and not any(e["state"] == "requeued" for e in events):
        return None
    marks = sorted([(_when(s), 0, "submitted") for s in submissions] + [(_when(e), 1, e["state"]) for e in events])
    queued, waiting_since = 0.0, None
    for when, _, what in marks:
        if what in ("submitted", "requeued"):
            waiting_since = when if waiting_since is None else waiting_since
        elif waiting_since is not None:
            queued, waiting_since = queued + max(when - waiting_since, 0.0), None
    if waiting_since is not None and state == "pending":
        queued += max(now - waiting_since, 0.0)
    return queued


ENDED_STATES = ("completed", "failed", "interrupted")  # a ledger state that ends a session of the run


def wall_seconds(submissions: list[dict], events: list[dict], state: str, now: float) -> float | None:
    """Wall time of a point over its sessions: each from its submission or first state to the state that
    ended it (or to now while it is pending or running); None for a point with no record yet."""
    marks = sorted([(_when(s), 0, "submitted") for s in submissions] + [(_when(e), 1, e["state"]) for e in events])
    if not marks:
        return None
    total, since = 0.0, None
    for when, _, what in marks:
        since = when if since is None else since
        if what in ENDED_STATES:
            total, since = total + max(when - since, 0.0), None
    if since is not None:
        total += max((now if state in ACTIVE else marks[-1][0]) - since, 0.0)
    return total


def point_status(point: dict, slurm: dict[str, str] | None, now: float | None = None) -> dict:
    """One point's row: state, progress, last metrics, wall and queue time, ETA, SLURM jobs, error and log."""
    now = time.time() if now is None else now
    results, ledger, submissions = point["results"], point["ledger"], point["submissions"]
    events = ledger.get("events", [])
    last, submitted = (events[-1] if events else None), (submissions[-1] if submissions else None)
    jobs = list(dict.fromkeys([*(s["slurm_job_id"] for s in submissions), *ledger.get("slurm_job_ids", [])]))
    resubmitted = submitted is not None and (last is None or _when(submitted) > _when(last))
    job = submitted["slurm_job_id"] if resubmitted else (last or {}).get("slurm_job_id") or (jobs[-1] if jobs else None)
    slurm_state = (slurm or {}).get(job) if job else None
    error = None
    if resubmitted:
        state = "pending"
    elif last is not None:
        state = "pending" if last["state"] == "requeued" else last["state"]
        error = last.get("error")
    else:
        state = {"completed": "completed", "failed": "failed", "interrupted": "interrupted"}.get(
            results.get("status"), "not_started")
        error = results.get("error") if state == "failed" else None
    if state in ACTIVE:  # believed only while its job or process is there
        if slurm_state in SLURM_RUNNING:
            state = "training" if state == "pending" else state
        elif slurm_state in SLURM_WAITING:
            state = "pending"
        elif slurm_state and slurm_state.startswith("CANCELLED"):
            state = "cancelled"
        elif slurm_state and slurm_state != "COMPLETED":
            state, error = "failed", f"SLURM job {job} ended {slurm_state} while {state} (no requeue): see its log"
        elif slurm_state == "COMPLETED" or (job is None and last is not None and _alive(last) is False):
            state, error = "interrupted", (f"the run stopped while {state} without recording why (process {last.get('pid')}"
                                           f" on {last.get('host')} is gone, e.g. killed)")
    elif state == "interrupted" and slurm_state and slurm_state.startswith("CANCELLED"):
        state = "cancelled"  # scancel's SIGTERM: the run saved and stopped, SLURM says who
    progress = ledger.get("progress", {})
    train = results.get("train") or {}
    max_steps = ((submitted or {}).get("max_steps") if resubmitted else None) or progress.get("max_steps") or (
        (results.get("config") or {}).get("train", {}).get("max_steps") or (submitted or {}).get("max_steps"))
    step = progress.get("step", train.get("step"))
    saved = ledger.get("checkpoint")  # the newest last.pt: where a stopped run resumes
    if state == "completed" and train.get("step") is not None:
        step = train["step"]
    elif state not in ACTIVE and saved:
        step = saved["step"]
    if state in ("interrupted", "cancelled"):
        error = resume_line(error or (last or {}).get("reason") or results.get("interrupted") or state, saved,
                            Path(point["run_dir"]))
    rate = progress.get("steps_per_s")
    if not rate and train.get("total_wall_time_s") and train.get("step"):
        rate = train["step"] / train["total_wall_time_s"]
    curve = results.get("curve") or []
    metrics = {k: v for k, v in (curve[-1] if curve else results.get("metrics") or {}).items() if k in SHOWN_METRICS}
    wall = wall_seconds(submissions, events, state, now)
    eta = (max_steps - step) / rate if state in ("training", "curve") and rate and max_steps and step is not None else None
    log_path = (submitted or {}).get("log") or str(Path(point["run_dir"]) / "launch.log")
    cost = results.get("device_hours") or (device_hours(results) if results.get("train") else {})
    devices = cost.get("count") or (results.get("device") or {}).get("count") or 1
    spent = cost.get("total", 0.0)
    first_running = len(events)  # this session's hours so far (results.json sums a session when it ends)
    while first_running and events[first_running - 1]["state"] in RUNNING_STATES:
        first_running -= 1
    if state in RUNNING_STATES and first_running < len(events):
        spent += max(now - _when(events[first_running]), 0.0) * devices / 3600
    queued = queued_seconds(submissions, events, state, now)
    halving = {k: last[k] for k in PRUNED_KEYS if k in last} if state == "pruned" else None
    return {"run_dir": point["run_dir"], "state": state, **({"halving": halving} if halving else {}), "step": step, "max_steps": max_steps,
            "steps_per_s": rate, "metrics": metrics, "metrics_step": (curve[-1]["step"] if curve else step) if metrics
            else None, "wall_time_s": round(wall, 1) if wall is not None else None,
            "queued_s": None if queued is None else round(queued, 1),
            "eta_s": round(eta, 1) if eta is not None else None, "slurm_job_ids": jobs, "slurm_state": slurm_state,
            "host": (last or {}).get("host"), "error": error.splitlines()[0] if error else None,
            "log": log_path if state in ("failed", "cancelled", "interrupted") else None,
            "device_hours": round(spent, 6), "device": cost.get("device") or (results.get("device") or {}).get("name"),
            "devices": devices,
            "sample_eval_hours": sum(cost.get(k, 0.0) for k in ("sample", "evaluate"))}


def resume_line(why: str, saved: dict | None, run_dir: Path) -> str:
    """What stopped a run and the step its rerun resumes from (the checkpoint the ledger recorded)."""
    if saved:
        where = f"resumes from step {saved['step']} ({saved['path']})"
    elif (run_dir / "checkpoints" / "last.pt").exists():  # written before the ledger recorded checkpoints
        where = "resumes from checkpoints/last.pt"
    else:
        where = "no checkpoint was written: a rerun starts from step 0"
    return f"{why}; {where}: run the same command again"


def sweep_status(sweep_dir: str | Path, now: float | None = None) -> dict:
    """{"points": [...], "totals": {...}} of a sweep folder (what --json prints)."""
    points = [read_point(d) for d in point_dirs(Path(sweep_dir))]
    jobs = {j for p in points for j in [*(s["slurm_job_id"] for s in p["submissions"]),
                                        *p["ledger"].get("slurm_job_ids", [])] if j}
    slurm = slurm_states(jobs)
    rows = [point_status(p, slurm, now) for p in points]
    out = {"sweep_dir": str(sweep_dir), "slurm": "sacct/squeue" if slurm is not None and jobs else "none",
           "points": rows, "totals": totals(rows)}
    if (Path(sweep_dir) / "halving" / "study.json").exists():  # a halving study: its rung table and device-hours
        from ddt.study import study_summary  # lazily: ddt.halving imports scipy (about 2 s)

        out["halving"] = study_summary(sweep_dir, {Path(r["run_dir"]).name: r["state"] for r in rows})
    return out


def totals(rows: list[dict]) -> dict:
    """Points per state, device-hours spent and an estimate of those still to go (measured rates)."""
    rates = [r["steps_per_s"] for r in rows if r["steps_per_s"]]
    evals = [r["sample_eval_hours"] for r in rows if r["state"] == "completed" and r["sample_eval_hours"]]
    typical_rate = statistics.median(rates) if rates else None
    to_go, unknown = 0.0, 0
    for r in rows:
        if r["state"] in DONE:
            continue
        rate = r["steps_per_s"] or typical_rate
        if rate and r["max_steps"] is not None:
            to_go += (r["max_steps"] - (r["step"] or 0)) / rate * (r["devices"] or 1) / 3600
            to_go += statistics.median(evals) if evals else 0.0
        else:
            unknown += 1
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    devices = sorted({f"{r['device']} x{r['devices']}" for r in rows if r["device"]})
    return {"points": len(rows), "states": {s: n for s, n in counts.items() if n},
            "device_hours_spent": round(sum(r["device_hours"] or 0.0 for r in rows), 4),
            "device_hours_to_go": round(to_go, 4), "points_without_estimate": unknown, "devices": devices}


def exit_code(status: dict) -> int:
    """0: every point completed (or pruned by a halving study); 3: some point pending or running; 1: otherwise."""
    states = [r["state"] for r in status["points"]]
    if any(s in ACTIVE for s in states):
        return 3
    return 0 if states and all(s in DONE for s in states) else 1


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def table(status: dict) -> str:
    """The status as text: one row per point, a line per failure (error and log), then the totals."""
    header = ["run", "state", "step", "FID", "sFID", "IS", "prec", "rec", "at step", "wall", "queued", "ETA",
              "slurm job (state)"]
    lines = []
    for r in status["points"]:
        m = r["metrics"]
        fmt = lambda k, f: format(m[k], f) if m.get(k) is not None else "-"  # noqa: E731
        step = f"{r['step'] if r['step'] is not None else '-'}/{r['max_steps'] if r['max_steps'] is not None else '?'}"
        jobs = ",".join(r["slurm_job_ids"][-2:]) + (f" ({r['slurm_state']})" if r["slurm_state"] else "")
        lines.append([Path(r["run_dir"]).name, r["state"], step, fmt("fid", ".2f"), fmt("sfid", ".2f"),
                      fmt("isc_mean", ".2f"), fmt("precision", ".3f"), fmt("recall", ".3f"),
                      r["metrics_step"] if r["metrics_step"] is not None else "-", _duration(r["wall_time_s"]),
                      _duration(r["queued_s"]), _duration(r["eta_s"]), jobs or "-"])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = [f"sweep {status['sweep_dir']}: {len(lines)} point(s)"]
    out += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *lines]]
    for r in status["points"]:
        if r["error"] or r["state"] in ("cancelled", "interrupted"):
            out.append(f"  {r['state']} {Path(r['run_dir']).name}: {r['error'] or r['state']} | log: {r['log']}")
        elif r.get("halving"):
            h = r["halving"]
            out.append(f"  pruned {Path(r['run_dir']).name}: at rung {h.get('rung')} ({h.get('rule')}): {h.get('reason')}")
    t = status["totals"]
    out.append("totals: " + ", ".join(f"{n} {s}" for s, n in t["states"].items()))
    unknown = f" (+{t['points_without_estimate']} point(s) without a measured rate)" if t["points_without_estimate"] else ""
    out.append(f"device-hours: {t['device_hours_spent']:.4f} spent, {t['device_hours_to_go']:.4f} to go{unknown}"
               f" [{', '.join(t['devices']) or 'no device recorded yet'}]")
    if status.get("halving"):
        out.append(status["halving"]["text"])
    return "\n".join(out)


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be a sweep folder, in one line (None when it is a folder)."""
    if Path(path).is_dir():
        return None
    what = "is a file, not a folder" if Path(path).exists() else "does not exist"
    return f"{path} {what}; give a sweep or run folder such as runs/quickstart"


def main(argv: list[str] | None = None) -> int:
    """The command line: print the status of a sweep folder (once, or every --watch seconds)."""
    parser = argparse.ArgumentParser(prog="python -m ddt.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder (runs/NAME) or one run folder")
    parser.add_argument("--watch", type=float, metavar="N", help="refresh every N seconds while points run")
    parser.add_argument("--json", action="store_true", help="print JSON: {points: [...], totals: {...}}")
    args = parser.parse_args(argv)
    problem = folder_problem(args.sweep_dir)
    if problem:
        print(f"ddt.status: error: {problem}", file=sys.stderr)
        return 2
    while True:
        status = sweep_status(args.sweep_dir)
        text = json.dumps(status, indent=2) if args.json else table(status)
        if args.watch and sys.stdout.isatty():
            print("\033[2J\033[H", end="")
        print(text, flush=True)
        code = exit_code(status)
        if not args.watch or code != 3:
            return code
        time.sleep(args.watch)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python -m ddt.status runs/x | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(0)
