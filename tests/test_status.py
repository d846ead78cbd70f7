"""Issue 32 without SLURM: run folder names, extending a run in place, the ledger and `python -m ddt.status`.

The SLURM half (detached submission, requeue-safe resubmission, scancel) is in test_slurm.py.
"""
import json
import os
import subprocess
import sys

import torch

from analysis.results import load_runs
from conftest import ROOT, launch
from ddt import checkpoint
from ddt.config import names_run, old_run_subdir, run_subdir
from ddt.ledger import Ledger, read_json
from ddt.status import exit_code, point_dirs, sweep_status, table

TINY = ["train.batch_size=16", "eval.num_samples=40", "eval.curve_num_samples=20", "sampler.num_steps=4",
        "sampler.batch_size=20", "progress=false"]


def status_json(sweep_dir) -> tuple[int, dict]:
    """`python -m ddt.status SWEEP_DIR --json` as a user runs it: exit code and the parsed output."""
    proc = subprocess.run([sys.executable, "-m", "ddt.status", str(sweep_dir), "--json"], cwd=ROOT,
                          capture_output=True, text=True)
    return proc.returncode, json.loads(proc.stdout)


def test_run_folders_are_named_by_what_defines_the_experiment():
    overrides = ["+cluster=localhost", "eval.num_samples=40", "model.encoder_depth=22", "train.max_steps=20",
                 "hydra.launcher.timeout_min=5", "logger=wandb", "progress=false", "device=cpu", "cache_dir=/c",
                 "eval.every_steps=10", "eval.curve_num_samples=20", "train.log_every=1", "stage=evaluate"]
    assert run_subdir(overrides) == "eval.num_samples=40,model.encoder_depth=22"  # the 2-task example
    assert old_run_subdir(overrides) == ("+cluster=localhost,eval.curve_num_samples=20,eval.every_steps=10,"  # the
                                         "eval.num_samples=40,model.encoder_depth=22,train.log_every=1,"  # earlier
                                         "train.max_steps=20")  # rule's name
    assert not names_run("hydra/launcher")
    assert run_subdir(["ckpt=/a/last.pt", "sampler=heun", "seed=1"]) == "ckpt=_a_last.pt,sampler=heun,seed=1"
    assert run_subdir(["train.max_steps=500"]) == "default" and run_subdir(["model.encoder_depth=8"]) == "model.encoder_depth=8"
    assert not names_run("hydra.launcher.name") and names_run("train.lr") and names_run("+experiment")


def test_extending_a_completed_run_continues_it_in_its_folder_to_bit_equal_weights(tmp_path, cache_dir):
    """A quickstart-size run of 20 steps raised to 30 (50% more) keeps its folder and curve, and ends with
    the weights of a run trained to 30 steps in one go."""
    common = ["-m", "train.ckpt_every=10", "eval.every_steps=10", *TINY]
    launch(*common, "train.max_steps=20", f"hydra.sweep.dir={tmp_path / 'extended'}")
    (folder,) = point_dirs(tmp_path / "extended")
    before = json.loads((folder / "results.json").read_text())
    assert folder.name == run_subdir(TINY) and before["train"]["step"] == 20  # no train.max_steps in it
    launch(*common, "train.max_steps=30", f"hydra.sweep.dir={tmp_path / 'extended'}")
    assert point_dirs(tmp_path / "extended") == [folder]  # the same folder, not a new run from step 0
    after = json.loads((folder / "results.json").read_text())
    assert after["status"] == "completed" and after["train"]["step"] == 30 and after["train"]["resumed_from_step"] == 20
    assert [(p["step"], p["final"]) for p in after["curve"]] == [(10, False), (20, False), (30, True)]
    assert after["curve"][0] == before["curve"][0]  # the earlier points are kept, not recomputed
    launch(*common, "train.max_steps=30", f"hydra.sweep.dir={tmp_path / 'one_go'}")
    extended = checkpoint.load(folder / "checkpoints" / "last.pt")
    one_go = checkpoint.load(tmp_path / "one_go" / folder.name / "checkpoints" / "last.pt")
    for part in ("model", "ema"):
        for key, value in one_go[part].items():
            assert torch.equal(extended[part][key], value), (part, key)
    events = [e["state"] for e in read_json(folder / "ledger.json")["events"]]
    assert events == ["training", "curve", "training", "sampling", "evaluating", "completed",
                      "training", "sampling", "evaluating", "completed"]
    hours = after["device_hours"]
    assert hours["count"] == 1 and hours["device_type"] == "cpu" and hours["train"] > 0
    assert abs(hours["train"] - after["train"]["total_wall_time_s"] / 3600) < 1e-6
    # the run's training time is both sessions' (the report's column), wall_time_s the extension's alone; the
    # first session's part is what its last.pt recorded, i.e. without that file's own write
    first_part = after["train"]["total_wall_time_s"] - after["train"]["wall_time_s"]
    assert 0.5 * before["train"]["total_wall_time_s"] < first_part <= before["train"]["total_wall_time_s"] + 0.01
    assert load_runs(tmp_path / "extended")["train.total_wall_time_s"].tolist() == [after["train"]["total_wall_time_s"]]
    assert abs(hours["total"] - sum(hours[k] for k in ("train", "curve", "sample", "evaluate"))) < 1e-5

    code, status = status_json(tmp_path / "extended")  # a local sweep: no SLURM anywhere
    (point,) = status["points"]
    assert code == 0 and status["slurm"] == "none" and point["state"] == "completed"
    assert (point["step"], point["max_steps"], point["slurm_job_ids"]) == (30, 30, [])
    assert point["metrics"]["fid"] == after["curve"][-1]["fid"] and status["totals"]["states"] == {"completed": 1}
    assert abs(status["totals"]["device_hours_spent"] - hours["total"]) < 1e-3
    watch = subprocess.run([sys.executable, "-m", "ddt.status", str(tmp_path / "extended"), "--watch", "1"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)  # nothing runs: one table, then exit 0
    assert watch.returncode == 0 and watch.stdout.count("totals: 1 completed") == 1


def test_status_of_every_state_a_folder_can_show(tmp_path):
    """Points written as the runner and the launcher write them: running, vanished, failed, not started."""
    sweep = tmp_path / "sweep"
    live = Ledger(sweep / "live")  # this very process: alive
    live.enter("training")
    live.progress(10, 100)
    live.data["progress"]["steps_per_s"] = 2.0
    live._write()
    gone = Ledger(sweep / "gone")  # its process is gone without a word: not "training" forever
    gone.enter("training")
    gone.progress(9, 100)
    gone.checkpoint(5)  # last.pt holds step 5: where it resumes, what status shows
    gone.data["events"][-1]["pid"] = 2 ** 22 + 1
    gone._write()
    failed = Ledger(sweep / "failed")
    failed.enter("failed", error="UsageError: eval.inception_weights=/x does not exist\nsecond line")
    (sweep / "sweep_points.json").write_text(json.dumps({"points": {"later": ["seed=3"]}}))
    status = sweep_status(sweep)
    rows = {os.path.basename(r["run_dir"]): r for r in status["points"]}
    assert {k: r["state"] for k, r in rows.items()} == {"live": "training", "gone": "interrupted",
                                                       "failed": "failed", "later": "not_started"}
    assert rows["live"]["eta_s"] == 45.0 and rows["live"]["step"] == 10 and rows["live"]["max_steps"] == 100
    assert "process" in rows["gone"]["error"] and rows["gone"]["log"].endswith("launch.log")
    assert rows["gone"]["step"] == 5 and rows["gone"]["error"].endswith(
        "; resumes from step 5 (checkpoints/last.pt): run the same command again")
    assert rows["failed"]["error"] == "UsageError: eval.inception_weights=/x does not exist"
    assert exit_code(status) == 3 and status["totals"]["states"]["training"] == 1
    text = table(status)
    assert "failed failed: UsageError: eval.inception_weights=/x does not exist | log:" in text
    assert "device-hours:" in text
    live.enter("completed")
    assert exit_code(sweep_status(sweep)) == 1  # nothing runs, but points failed or never started


def test_a_run_made_under_the_earlier_folder_rule_is_named_with_what_to_rename(tmp_path, cache_dir):
    old = tmp_path / old_run_subdir(["train.max_steps=2", *TINY])  # the earlier rule's name for this run
    assert old.name.endswith(",train.max_steps=2")
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"status": "completed"}))
    proc = launch("-m", "train.max_steps=2", *TINY, f"hydra.sweep.dir={tmp_path}", check=False)
    new = tmp_path / run_subdir(TINY)
    assert proc.returncode == 2 and f"mv '{old}' '{new}'" in proc.stderr, proc.stderr[-2000:]
    assert not new.exists()  # nothing started


def test_sweep_points_that_would_share_a_folder_are_refused_before_any_starts(tmp_path, cache_dir):
    proc = launch("-m", "train.max_steps=2,4", *TINY, f"hydra.sweep.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "would share the run folder" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / run_subdir(TINY)).exists()


def test_a_job_that_vanished_is_shown_as_what_slurm_says():
    from ddt.status import _expand, point_status

    def point(state="training", job="12_0"):
        event = {"state": state, "time": "2026-12-06T10:00:00Z", "unix_time": 1.0, "host": "node7", "pid": 1,
                 "slurm_job_id": job}
        return {"run_dir": "/sweep/p", "results": {}, "ledger": {"events": [event], "slurm_job_ids": [job]},
                "submissions": [{"slurm_job_id": job, "unix_time": 0.5, "log": "/sweep/.submitit/12_0_log.err"}]}

    for slurm_state, state in (("RUNNING", "training"), ("PENDING", "pending"), ("REQUEUED", "pending"),
                               ("CANCELLED", "cancelled"), ("OUT_OF_MEMORY", "failed"), ("TIMEOUT", "failed"),
                               ("NODE_FAIL", "failed")):
        row = point_status(point(), {"12_0": slurm_state}, now=100.0)
        assert row["state"] == state, slurm_state
        if state == "failed":
            assert row["error"] == f"SLURM job 12_0 ended {slurm_state} while training (no requeue): see its log"
            assert row["log"] == "/sweep/.submitit/12_0_log.err"
    assert point_status(point("interrupted"), {"12_0": "CANCELLED"})["state"] == "cancelled"  # scancel's SIGTERM
    assert point_status(point("completed"), {"12_0": "COMPLETED"})["state"] == "completed"
    assert _expand({"12_[0-2,5%4]": "PENDING", "13": "CANCELLED by 0"}) == {
        "12_0": "PENDING", "12_1": "PENDING", "12_2": "PENDING", "12_5": "PENDING", "13": "CANCELLED"}
    # sacct after `scancel 61_2` while task 2 had not started: the tasks that ran, then the array's range record
    assert _expand({"61_0": "COMPLETED", "61_1": "COMPLETED", "61_[0-2%3]": "CANCELLED by 0"}) == {
        "61_0": "COMPLETED", "61_1": "COMPLETED", "61_2": "CANCELLED"}


def test_queue_wait_is_told_apart_from_running_time():
    """Wall time sums the run's sessions from their submissions; `queued` is the part spent waiting for SLURM."""
    from ddt.status import point_status, queued_seconds

    def at(state, t, job="12_0"):
        return {"state": state, "unix_time": t, "host": "node7", "pid": 1, "slurm_job_id": job}

    submissions = [{"slurm_job_id": "12_0", "unix_time": 10.0}, {"slurm_job_id": "15_0", "unix_time": 500.0}]
    events = [at("training", 70.0), at("requeued", 200.0), at("training", 230.0), at("completed", 400.0)]
    # 60 s before the first start, 30 s after the preemption's requeue, and the extension still waiting
    assert queued_seconds(submissions, events, "pending", now=520.0) == 60.0 + 30.0 + 20.0
    assert queued_seconds(submissions, events[:2], "pending", now=210.0) == 60.0 + 10.0
    assert queued_seconds(submissions[:1], events[:1], "cancelled", now=999.0) == 60.0
    assert queued_seconds([], [at("training", 1.0), at("completed", 5.0)], "completed", now=9.0) is None  # local

    point = {"run_dir": "/sweep/p", "results": {}, "ledger": {"events": events, "slurm_job_ids": ["12_0"]},
             "submissions": submissions}
    row = point_status(point, {"15_0": "PENDING"}, now=520.0)  # 10-400 and 500-520: not the 100 s between them
    assert (row["state"], row["wall_time_s"], row["queued_s"]) == ("pending", 410.0, 110.0)
    text = table({"sweep_dir": "/sweep", "points": [row], "totals": {
        "states": {"pending": 1}, "device_hours_spent": 0.0, "device_hours_to_go": 0.0,
        "points_without_estimate": 1, "devices": []}})
    header, line = text.splitlines()[1:3]
    assert header.split()[-6:] == ["wall", "queued", "ETA", "slurm", "job", "(state)"]
    assert line.split()[-5:] == ["6m50s", "1m50s", "-", "12_0,15_0", "(PENDING)"]  # no ETA before it trains


def test_status_piped_into_head_ends_quietly(tmp_path):
    """`python -m ddt.status DIR | head -1`: the closed pipe is not a traceback (a table longer than the pipe's
    64 KiB, so that the reader is gone before the writer is done)."""
    for i in range(800):
        Ledger(tmp_path / f"point_with_a_long_name_{i:04d}").enter("training")
    proc = subprocess.run(f"{sys.executable} -m ddt.status {tmp_path} | head -1", shell=True, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.startswith("sweep ") and "Traceback" not in proc.stderr, proc.stderr
