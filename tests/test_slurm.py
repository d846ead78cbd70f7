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


# A detached halving study (issue 42): 4 splits x 2 seeds on digits at a tiny width, two rungs.
# 1000 samples and 16 sampler steps: at fewer, the two seeds' FIDs lie so far apart that no interval is apart from
# the best's (docs/halving.md); PRC and KID off, FID alone is ranked.
STUDY_TINY = ["model.depth=6", "model.hidden_size=32", "model.num_heads=2", "train.batch_size=16",
              "eval.num_samples=1000", "eval.prc=false", "eval.kid=false", "sampler.num_steps=16",
              "sampler.batch_size=1000", "progress=false"]
STUDY_SPLITS, STUDY_RUNGS = "model.encoder_depth=1,2,4,5", (600, 700)


def keep_rule(values: dict[str, list[float]], eta: int) -> set[str]:
    """The configurations a rung keeps, by hand from issue 42's rule: the best ceil(n/eta) by mean FID, and any
    whose 95% interval (two seeds: t(0.975, 1) = 12.706 x std / sqrt(2)) overlaps the best's."""
    import math
    import statistics

    mean = {c: statistics.fmean(v) for c, v in values.items()}
    half = {c: 12.706 * statistics.stdev(v) / math.sqrt(2) for c, v in values.items()}
    order = sorted(mean, key=mean.get)
    best, cut = order[0], mean[order[math.ceil(len(order) / eta) - 1]]
    return {c for c in order if mean[c] <= cut or mean[c] - half[c] <= mean[best] + half[best]}


def test_detached_halving_study(tmp_path, cache_dir, slurm):
    """The study returns at once; re-issued mid-study it submits nothing; a cancelled point blocks the rung until
    the command is given again (which resubmits it alone); the decision job decides and submits the last rung;
    status shows the pruned points with their reasons and the device-hours; a survivor's weights are bit-equal to
    a run trained to the last rung in one go."""
    from ddt import checkpoint
    from ddt.halving import read_decisions
    from ddt.study import passed_overrides, read_study

    name, study_dir = f"ddt-halving-{uuid.uuid4().hex[:8]}", tmp_path / "study"
    args = ["+halving=on", f"halving.rungs=[{STUDY_RUNGS[0]},{STUDY_RUNGS[1]}]", "halving.eta=2", STUDY_SPLITS,
            "seed=0,1", *STUDY_TINY]
    decision_jobs = study_dir / "halving" / "decision_jobs.json"
    try:
        seconds, first = detached(*args, sweep_dir=study_dir, name=name)
        assert f"rung {STUDY_RUNGS[0]}: submitted 8 of 8 point(s) as SLURM array" in first.stdout, first.stdout
        assert "decision job" in first.stdout and "afterany" in first.stdout
        code, now = status(study_dir)
        assert code == 3 and not read_decisions(study_dir), now  # nothing waited for the points
        jobs = decision_jobs.read_text()
        _, again = detached(*args, sweep_dir=study_dir, name=name)  # mid-study: nothing new
        assert f"rung {STUDY_RUNGS[0]}: submitted 0 of 8 point(s)" in again.stdout and "is waiting" in again.stdout
        assert decision_jobs.read_text() == jobs
        study = read_study(study_dir)
        cancelled = study.points[-1].name  # the last array task: pending while two others train on the 2 CPUs
        array = json.loads((study_dir / cancelled / "submissions.json").read_text())["submissions"][-1]["slurm_job_id"]
        subprocess.run(["scancel", array], check=True)
        # the decision job runs once every point ended, finds the cancelled one and decides nothing
        blocked = wait_for(lambda: (lambda s: s if s[0] != 3 else None)(status(study_dir)), timeout=900)[1]
        assert not read_decisions(study_dir)
        rows = {Path(p["run_dir"]).name: p for p in blocked["points"]}
        assert rows[cancelled]["state"] == "cancelled" and f"blocked: {cancelled} cancelled" in blocked["halving"]["text"]
        _, resubmitted = detached(*args, sweep_dir=study_dir, name=name)  # the user's word: resubmit it
        assert f"rung {STUDY_RUNGS[0]}: submitted 1 of 8 point(s)" in resubmitted.stdout, resubmitted.stdout
        assert f"submitted      {cancelled}:" in resubmitted.stdout

        code, done = wait_for(lambda: (lambda s: s if s[0] != 3 and s[1]["halving"]["final"] else None)(
            status(study_dir)), timeout=1200)  # the survivors ranked at the last rung
        (decision,) = read_decisions(study_dir).values()
        rows = {Path(p["run_dir"]).name: p for p in done["points"]}
        pruned = [p.name for p in study.points if p.config_id in decision.pruned]
        survivors = [p.name for p in study.points if p.config_id in decision.kept]
        values = {}
        for p in study.points:
            curve = json.loads((study_dir / p.name / "results.json").read_text())["curve"]
            values.setdefault(p.config_id, []).append(next(c["fid"] for c in curve if c["step"] == STUDY_RUNGS[0]))
        assert code == 0 and set(decision.kept) == keep_rule(values, 2), done["halving"]["text"]
        for run in pruned:
            h = rows[run]["halving"]
            assert rows[run]["state"] == "pruned" and h["rung"] == STUDY_RUNGS[0] and h["rule"] == "cut"
            assert "apart from the best's" in h["reason"] or "rank alone decides" in h["reason"]
        for run in survivors:
            assert rows[run]["state"] == "completed" and rows[run]["step"] == STUDY_RUNGS[1]
        text = subprocess.run([sys.executable, "-m", "ddt.status", str(study_dir)], cwd=ROOT, capture_output=True,
                              text=True).stdout
        assert ("PRUNED" in text) == bool(pruned) and "saved" in text and "device-hours:" in text
        print(f"\ndetached study command returned in {seconds:.1f} s\n" + text[text.index("halving study"):])
    finally:
        subprocess.run(["scancel", "-n", name])
        subprocess.run(["scancel", "-n", f"{name}_decide"])

    # a survivor trained to the last rung in one go (one thread, as its SLURM job ran): the same bits
    one_go = tmp_path / "one_go"
    point = next(p for p in study.points if p.name == survivors[0])
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *passed_overrides(point.overrides),
                           f"train.max_steps={STUDY_RUNGS[1]}", f"hydra.run.dir={one_go}"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    extended = checkpoint.load(study_dir / survivors[0] / "checkpoints" / "last.pt")
    reference = checkpoint.load(one_go / "checkpoints" / "last.pt")
    for key, value in reference["ema"].items():
        assert torch.equal(extended["ema"][key], value), key
