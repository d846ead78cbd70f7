"""logger=wandb with the real wandb in offline mode: what it records, resuming, and surviving failures."""
import json
import logging

import pytest
import torch

from analysis.wandb_offline import offline_runs
from conftest import launch
from ddt.tracking import WandbTracker

TINY = ["model.depth=4", "model.encoder_depth=3", "model.hidden_size=32", "model.num_heads=2",
        "train.batch_size=16", "train.ckpt_every=3", "train.log_every=1", "eval.num_samples=40", "sampler.num_steps=4",
        "sampler.batch_size=20", "progress=false", "logger=wandb", "logger.mode=offline", "logger.project=ddt-test",
        "logger.grid_size=4", "tags=[smoke,tiny]"]


def test_offline_run_records_config_history_summary_group_and_resumes_the_same_run(tmp_path, cache_dir):
    run_dir = tmp_path / "quickstart" / "run"
    launch(*TINY, "train.max_steps=6", f"hydra.run.dir={run_dir}")
    results = json.loads((run_dir / "results.json").read_text())
    (run,) = offline_runs(run_dir)
    assert run.id == (run_dir / "wandb_id.txt").read_text().strip()
    assert run.group == (run_dir.parent / "wandb_group.txt").read_text().strip() and run.group.startswith("quickstart-")
    assert run.job_type == "train+sample+evaluate" and run.tags == ["smoke", "tiny"] and run.project == "ddt-test"
    assert run.config["model.encoder_depth"] == 3 and run.config["sampler.num_steps"] == 4  # flattened
    assert run.summary["fid"] == pytest.approx(results["metrics"]["fid"]) and run.summary["step"] == 6
    assert run.summary["status"] == "completed" and run.summary["train.images_per_s"] > 0
    history = run.history()
    losses = history.dropna(subset=["train/loss"])
    assert losses["_step"].tolist() == [1, 2, 3, 4, 5, 6] and (losses["train/loss"] > 0).all()
    grids = history.dropna(subset=["samples/ema_grid"])["_step"].tolist()
    assert grids == [3, 6]  # an EMA sample grid at every checkpoint

    launch(*TINY, "train.max_steps=9", f"hydra.run.dir={run_dir}")  # resume: the same W&B run continues
    first, second = offline_runs(run_dir)
    assert first.id == second.id == run.id and first.group == second.group
    assert second.history().dropna(subset=["train/loss"])["_step"].tolist() == [7, 8, 9]
    assert second.summary["step"] == 9


def test_a_wandb_failure_never_stops_training(tmp_path, monkeypatch, caplog):
    import wandb

    real_init = wandb.init

    def unreachable(mode="online", **kwargs):
        if mode != "offline":
            raise ConnectionError("api.wandb.ai unreachable")
        return real_init(mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", unreachable)
    config = {"name": "failing", "model": {"encoder_depth": 3}}
    logger_cfg = {"project": "ddt-test", "mode": "online", "tags": []}
    with caplog.at_level(logging.WARNING, logger="ddt.tracking"):
        tracker = WandbTracker(logger_cfg, config=config, run_dir=tmp_path / "run", sweep_dir=tmp_path, job_type="train")
        assert tracker.run.settings.mode == "offline" and "logging offline" in caplog.text

        def broken(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(tracker.run, "log", broken)
        from test_train import trainer  # a real Trainer on a tiny model
        t = trainer(tmp_path / "train", 4)
        t.log = tracker.log
        stats = t.fit()
        tracker.summary({"fid": 1.0})
        tracker.finish()
    assert stats["step"] == 4 and torch.isfinite(torch.tensor(stats["final_loss"]))
    assert caplog.text.count("W&B call failed") == 1  # warned once, then quiet
