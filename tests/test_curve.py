"""FID-vs-step curves: points at eval.every_steps from real short runs, kill/resume, stage=curve, config_id."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from analysis.wandb_offline import offline_runs
from conftest import ROOT, launch
from ddt.config import config_id, validate

SHORT = ["train.max_steps=12", "train.batch_size=16", "train.ckpt_every=6", "train.log_every=2", "eval.num_samples=40",
         "sampler.num_steps=4", "sampler.batch_size=20", "progress=false"]
METRICS = ("fid", "isc_mean", "kid_mean", "precision", "recall")


def results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def same_point(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9) for k in METRICS)


def test_every_steps_gives_points_equal_to_evaluating_the_kept_checkpoints(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    launch(*SHORT, "eval.every_steps=4", "logger=wandb", "logger.mode=offline", "logger.project=ddt-test",
           f"hydra.run.dir={run_dir}")
    r = results(run_dir)
    curve = r["curve"]
    assert [p["step"] for p in curve] == [4, 8, 12] and [p["final"] for p in curve] == [False, False, True]
    assert all(p["num_samples"] == 40 and set(METRICS) <= set(p) for p in curve)
    assert same_point(curve[-1], {"step": 12, **r["metrics"]})  # the final point is the run's evaluation
    assert {p.name for p in (run_dir / "checkpoints").glob("step_*.pt")} == {"step_4.pt", "step_8.pt"}
    assert r["curve_cost"]["intermediate_points"] == 2 and 0 < r["curve_cost"]["share"] < 1
    assert r["train"]["curve_eval_wall_time_s"] > 0
    assert r["feature_extractor"]["sha256"] == r["evaluate"]["feature_extractor_sha256"]
    assert not list(cache_dir.rglob("digits_classifier*"))  # the shipped extractor: nothing trained here

    # A point is the evaluation of its kept checkpoint: stage=evaluate on step_4.pt gives the same numbers.
    launch(*SHORT, "stage=evaluate", f"ckpt='{run_dir / 'checkpoints' / 'step_4.pt'}'",
           f"hydra.run.dir={tmp_path / 'step4'}")
    assert same_point(curve[0], {"step": 4, **results(tmp_path / "step4")["metrics"]})

    # W&B gets the same numbers as eval/* against the training step.
    (run,) = offline_runs(run_dir)
    history = run.history().dropna(subset=["eval/fid"])
    assert history["eval/step"].tolist() == [4, 8, 12]
    assert history["eval/fid"].tolist() == pytest.approx([p["fid"] for p in curve])
    assert history["eval/kid_mean"].tolist() == pytest.approx([p["kid_mean"] for p in curve])
    assert run.config["config_id"] == r["config_id"]


def test_a_kill_during_an_intermediate_evaluation_resumes_it_without_losing_or_duplicating_points(tmp_path, cache_dir):
    args = [*SHORT, "train.max_steps=8", "eval.every_steps=4", "eval.curve_num_samples=60", "sampler.batch_size=5"]
    launch(*args, f"hydra.run.dir={tmp_path / 'straight'}")
    run_dir = tmp_path / "killed"
    samples = run_dir / "curve" / "step_0000004" / "samples"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(samples.glob("*.png"))) < 10:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = {p.name: p.stat().st_mtime_ns for p in samples.glob("*.png")}
    assert 10 <= len(written) < 60, len(written)  # killed in the middle of the step-4 point
    assert "curve" not in results(run_dir)

    launch(*args, f"hydra.run.dir={run_dir}")
    resumed, straight = results(run_dir), results(tmp_path / "straight")
    assert [p["step"] for p in resumed["curve"]] == [4, 8]
    assert all(same_point(a, b) for a, b in zip(resumed["curve"], straight["curve"]))
    assert resumed["train"]["resumed_from_step"] == 4  # training went on from step_4's last.pt
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("*.png") if p.name in written} == written


def test_stage_curve_fills_in_exactly_the_missing_points_from_kept_checkpoints(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    launch(*SHORT, "train.keep_every=4", f"hydra.run.dir={run_dir}")  # trained without eval.every_steps
    assert [p["step"] for p in results(run_dir)["curve"]] == [12]
    launch(*SHORT, "train.keep_every=4", "stage=curve", f"hydra.run.dir={run_dir}")
    filled = results(run_dir)["curve"]
    assert [(p["step"], p["final"]) for p in filled] == [(4, False), (8, False), (12, True)]

    # Drop the step-8 point: stage=curve recomputes it alone, to the same numbers.
    r = results(run_dir)
    (run_dir / "results.json").write_text(json.dumps({**r, "curve": [filled[0], filled[2]]}))
    proc = launch(*SHORT, "train.keep_every=4", "stage=curve", f"hydra.run.dir={run_dir}")
    again = results(run_dir)["curve"]
    assert [p["step"] for p in again] == [4, 8, 12] and again[0] == filled[0] and again[2] == filled[2]
    assert same_point(again[1], filled[1])
    log = proc.stdout + proc.stderr
    assert "curve point at step 8" in log and "curve point at step 4" not in log

    # Points made with another sampler are set aside (kept in curve_stale), not mixed into the curve.
    launch(*SHORT, "train.keep_every=4", "stage=curve", "sampler.cfg_scale=1.0", f"hydra.run.dir={run_dir}")
    r = results(run_dir)
    assert [p["step"] for p in r["curve"]] == [4, 8, 12] and [p["step"] for p in r["curve_stale"]] == [4, 8, 12]
    assert r["curve_stale"][0]["fid"] == again[0]["fid"] and r["curve"][0]["fid"] != again[0]["fid"]


def test_config_id_is_shared_by_seeds_and_nothing_else(compose):
    base = config_id(validate(compose()))
    assert config_id(validate(compose("seed=3"))) == base
    assert config_id(validate(compose("seed=1", "progress=false", "logger=wandb", "name=other"))) == base
    # how and where it ran: a resume's ckpt, the stages, the length (compared at a common step), cadences
    how = ("stage=evaluate", "ckpt=x.pt", "device=cpu", "train.max_steps=60", "train.ckpt_every=7",
           "train.log_every=3", "eval.every_steps=20", "eval.curve_num_samples=50", "eval.feature_batch_size=10",
           "sampler.batch_size=7", "data.num_workers=2", "cache_dir=/elsewhere")
    assert config_id(validate(compose(*how))) == base
    for change in ("model.encoder_depth=8", "train.lr=1e-3", "sampler.cfg_scale=1.0", "sampler.num_steps=8",
                   "eval.num_samples=100", "train.batch_size=32"):
        assert config_id(validate(compose(change))) != base, change
    assert len(base) == 12


def test_curve_settings_are_checked_before_any_work(compose):
    with pytest.raises(ValueError, match="eval.every_steps=-1"):
        validate(compose("eval.every_steps=-1"))
    with pytest.raises(ValueError, match="eval.curve_num_samples=0"):
        validate(compose("eval.curve_num_samples=0"))
    with pytest.raises(ValueError, match="eval=none computes no metrics"):
        validate(compose("eval=none", "eval.every_steps=100"))


def test_keys_added_later_at_their_old_value_leave_config_id_and_completion_alone():
    from ddt.config import comparable, config_id

    old = {"seed": 0, "model": {"depth": 4}, "sampler": {"solver": "euler"}, "eval": {"name": "fid_digits"}}
    new = {"seed": 0, "model": {"depth": 4, "decoder_hidden_size": None, "decoder_num_heads": None},
           "sampler": {"solver": "euler", "order": None},
           "eval": {"name": "fid_digits", "fd_dinov2": False, "dinov2_model": "dinov2-vit-l-14", "dinov2_weights": None}}
    assert comparable(new) == old and config_id(new) == config_id(old)
    assert new["sampler"] == {"solver": "euler", "order": None}  # a copy: the caller's config is untouched
    changed = {**new, "eval": {**new["eval"], "fd_dinov2": True}}
    assert config_id(changed) != config_id(old)  # a new key set to something new is a new setting
