"""`python launch.py` as a user runs it: the run directory, resume, sweeps and early failures."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import launch

SHORT = ["train.max_steps=6", "train.batch_size=16", "train.ckpt_every=3", "eval.num_samples=40",
         "sampler.num_steps=4", "sampler.batch_size=20", "progress=false"]


def test_quickstart_end_to_end_and_resume(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    launch(*SHORT, f"hydra.run.dir={run_dir}")
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["model"]["encoder_depth"] == 22
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert len(list((run_dir / "samples").glob("*.png"))) == 40
    npz = np.load(run_dir / "samples" / "samples.npz")
    assert npz["arr_0"].shape == (40, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [i % 10 for i in range(40)]
    assert (run_dir / "sample_grid.png").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["train"]["step"] == 6 and results["sample"]["generated"] == 40
    assert results["metrics"]["fid"] > 0 and 1 <= results["metrics"]["isc_mean"] <= 10
    assert results["feature_extractor"]["test_accuracy"] > 0.95
    assert results["model"]["decoder_depth"] == 6 and results["versions"]["torch"]

    # The same command on a completed run is skipped (progress is not part of what a run computes).
    stamp = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    proc = launch(*SHORT, f"hydra.run.dir={run_dir}", "progress=true")
    assert "already completed" in proc.stderr  # the console log goes to stderr
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp

    # An unfinished run (killed during evaluation) resumes: nothing is retrained or resampled.
    (run_dir / "results.json").write_text(json.dumps({**results, "status": "running"}))
    launch(*SHORT, f"hydra.run.dir={run_dir}")
    again = json.loads((run_dir / "results.json").read_text())
    assert again["status"] == "completed"
    assert again["train"]["steps_this_session"] == 0 and again["sample"]["generated"] == 0
    assert again["metrics"]["fid"] == pytest.approx(results["metrics"]["fid"], rel=1e-6)

    # Training further continues from step 6; old samples are moved aside, not deleted.
    launch(*[a.replace("max_steps=6", "max_steps=8") for a in SHORT], f"hydra.run.dir={run_dir}")
    longer = json.loads((run_dir / "results.json").read_text())
    assert longer["train"]["resumed_from_step"] == 6 and longer["train"]["step"] == 8
    assert longer["sample"]["generated"] == 40
    assert len(list(run_dir.glob("samples.stale-*/*.png"))) == 40


def test_evaluate_only_sweep_over_sharing_from_a_checkpoint(tmp_path, cache_dir):
    launch(*SHORT, "stage=train", f"hydra.run.dir={tmp_path / 'trained'}")
    ckpt = tmp_path / "trained" / "checkpoints" / "last.pt"
    assert not (tmp_path / "trained" / "samples").exists()
    launch("-m", *SHORT, "sampler.num_steps=6", "stage=evaluate", f"ckpt={ckpt}",
           "sampler.sharing=none,uniform,dp", "sampler.num_recompute=3", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    runs = {}
    for path in (tmp_path / "sweep").glob("*/results.json"):
        results = json.loads(path.read_text())
        assert results["status"] == "completed" and "train" not in results and results["metrics"]["fid"] > 0
        runs[results["sample"]["sharing"]] = (path.parent, results["sample"])
    assert set(runs) == {"none", "uniform", "dp"}
    none, uniform, dp = (runs[k][1] for k in ("none", "uniform", "dp"))
    # CFG 2 on (0, 1): every step but the first (t = 0) runs both halves.
    assert none["step"] == 6 and none["num_recompute"] == 6
    assert none["encoder_passes_per_image"] == none["decoder_passes_per_image"] == 11
    # Step 0 also encodes the unconditional half, which step 1 (guided) reuses.
    assert uniform["recompute_steps"] == [0, 2, 4] and uniform["encoder_passes_per_image"] == 6
    assert uniform["decoder_passes_per_image"] == 11 and uniform["sharing_ratio"] == 0.5
    assert dp["recompute_steps"][0] == 0 and len(dp["recompute_steps"]) == 3 and dp["dp_cost"] <= dp["uniform_cost"]
    schedule = json.loads((runs["dp"][0] / "sharing_schedule.json").read_text())
    assert len(schedule["similarity"]) == 6 and schedule["recompute_steps"] == dp["recompute_steps"]
    # Adams-Bashforth takes Euler's sharing decisions and one evaluation per step (fresh timestep too)
    launch("-m", *SHORT, "sampler=adams", "sampler.order=3", "sampler.num_steps=6", "stage=evaluate", f"ckpt={ckpt}",
           "sampler.sharing=uniform,dp", "sampler.num_recompute=3", "sampler.fresh_timestep=true",
           f"hydra.sweep.dir={tmp_path / 'adams'}")
    for path in (tmp_path / "adams").glob("*/results.json"):
        results = json.loads(path.read_text())
        adams = results["sample"]
        assert results["status"] == "completed" and results["config"]["sampler"]["order"] == 3
        assert adams["nfe_per_image"] == 6 and none["nfe_per_image"] == 6
        if adams["sharing"] == "uniform":
            assert adams["recompute_steps"] == uniform["recompute_steps"] and adams["encoder_passes_per_image"] == 6
        else:  # dp measures step similarities on Adams trajectories: its own schedule, of the same size
            assert adams["recompute_steps"][0] == 0 and len(adams["recompute_steps"]) == 3


def test_multirun_over_encoder_depth(tmp_path, cache_dir):
    args = [a for a in SHORT if not a.startswith("train.max_steps")]
    proc = launch("-m", "model.encoder_depth=8,16,22", "train.max_steps=2", "eval.num_samples=20",
                  *[a for a in args if not a.startswith("eval.num_samples")], f"hydra.sweep.dir={tmp_path}")
    dirs = sorted(p.parent for p in tmp_path.glob("*/results.json"))
    assert len(dirs) == 3
    # the end of a sweep: ddt.status's table, one row per point (folder, state, step, metrics), then totals,
    # device-hours and where the report command is
    rows = re.findall(r"^(\S*model\.encoder_depth=\d+\S*) +completed +2/2 +(\d+\.\d+) ", proc.stderr, re.M)
    assert len(rows) == 3 and "totals: 3 completed" in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"^device-hours: \d+\.\d+ spent, 0\.0000 to go", proc.stderr, re.M)
    assert f"report: python -m analysis.report {tmp_path}" in proc.stderr
    # 20 samples are too few for IS on 10 classes: the run says so where the metrics are computed
    assert "IS from 20 samples is 2 per split" in proc.stderr
    seen = {}
    for d in dirs:
        results = json.loads((d / "results.json").read_text())
        assert results["status"] == "completed" and "fid" in results["metrics"]
        seen[results["model"]["encoder_depth"]] = results["model"]["decoder_depth"]
        assert f"model.encoder_depth={results['model']['encoder_depth']}" in d.name
    assert seen == {8: 20, 16: 12, 22: 6}


def test_bad_config_fails_before_any_work(tmp_path, cache_dir):
    proc = launch("model.encoder_depth=28", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "model.encoder_depth=28" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_bad_value_in_one_sweep_point_stops_the_sweep_before_any_point_trains(tmp_path, cache_dir):
    proc = launch("-m", "model.encoder_depth=8,40", *SHORT, f"hydra.sweep.dir={tmp_path / 'sweep'}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "sweep point model.encoder_depth=40" in proc.stderr and "model.depth=28" in proc.stderr
    assert "no sweep point was started" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists()  # not even the valid point 8 started


def test_missing_inception_weights_stop_before_training(tmp_path, cache_dir):
    proc = launch("eval=fid_imagenet", f"eval.inception_weights={tmp_path / 'inception.pth'}",
                  "train=smoke", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0 and "inception.pth does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before Hydra made the folder: nothing written


class LightningHyperParameters(dict):
    """Stands for the objects Lightning pickles into its checkpoints; loading must never build it."""

    def __reduce__(self):
        return (_record_unpickling, ("hyper_parameters",))


UNPICKLED = []


def _record_unpickling(name):
    UNPICKLED.append(name)
    return {}


def test_evaluate_an_official_lightning_checkpoint(tmp_path, cache_dir):
    """Released layout: EMA weights are used (the raw denoiser is NaN here), foreign pickles never run."""
    import torch

    from ddt.checkpoint import load, to_official_lightning
    from ddt.models import DDT

    tiny = ["model.depth=4", "model.encoder_depth=3", "model.hidden_size=32", "model.num_heads=2"]
    torch.manual_seed(0)
    model = DDT(in_channels=3, patch_size=4, hidden_size=32, num_heads=2, depth=4, encoder_depth=3, num_classes=10)
    ema = model.state_dict()
    raw = {k: torch.full_like(v, float("nan")) for k, v in ema.items()}
    projector = {"0.weight": torch.zeros(8, 32), "2.weight": torch.zeros(8, 8), "4.weight": torch.zeros(16, 8)}
    official = {**to_official_lightning(raw, ema, projector, step=7),
                "hyper_parameters": LightningHyperParameters(lr=1e-4)}
    torch.save(official, tmp_path / "official.ckpt")
    loaded = load(tmp_path / "official.ckpt")
    assert not UNPICKLED and loaded["global_step"] == 7
    assert "diffusion_trainer.proj.0.4.weight" in loaded["state_dict"]
    from ddt.weights import load_weights
    assert load_weights(model, tmp_path / "official.ckpt", ema=False) is None  # ckpt_ema=false: the raw weights
    assert all(torch.isnan(p).all() for p in model.parameters())
    launch(*SHORT, *tiny, "stage=[sample,evaluate]", f"ckpt={tmp_path / 'official.ckpt'}",
           f"hydra.run.dir={tmp_path / 'eval'}")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["status"] == "completed" and results["sample"]["step"] is None
    assert math.isfinite(results["metrics"]["fid"]) and results["metrics"]["fid"] > 0

    proc = launch(*SHORT, "stage=[sample,evaluate]", f"ckpt={tmp_path / 'official.ckpt'}",
                  f"hydra.run.dir={tmp_path / 'mismatch'}", check=False)
    assert proc.returncode != 0 and "does not fit the configured model" in proc.stderr


def test_submitit_local_sweep(tmp_path, cache_dir):
    """`+cluster=local`: the same sweep as jobs of submitit's local executor, results in the same layout."""
    args = [a for a in SHORT if not a.startswith(("train.max_steps", "eval.num_samples"))]
    launch("-m", "+cluster=local", "model.encoder_depth=8,16", "train.max_steps=2", "eval.num_samples=20",
           *args, f"hydra.sweep.dir={tmp_path}")
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    assert sorted(r["model"]["encoder_depth"] for r in results) == [8, 16]
    assert all(r["status"] == "completed" and r["metrics"]["fid"] > 0 for r in results)
    assert len(list(tmp_path.glob(".submitit/*/*/*_result.pkl"))) == 2  # submitit ran them as jobs


def test_a_sweep_for_slurm_nodes_leaves_the_device_to_the_node_but_a_local_one_checks_it(tmp_path, monkeypatch):
    """device=cuda on a machine without a GPU: refused for a local sweep before anything is written; a sweep
    submitted to SLURM from a login node is not refused for it (the node has the GPU)."""
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device=cuda is valid here either way")
    spec = importlib.util.spec_from_file_location("launch_script", Path(__file__).parents[1] / "launch.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as stop:
        script.preflight(["-m", "device=cuda", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'local'}"])
    assert stop.value.code == 2 and not (tmp_path / "local").exists()
    sweep = script.preflight(["-m", "+cluster=localhost_detached", "device=cuda", "seed=0,1",
                              f"hydra.sweep.dir={tmp_path / 'slurm'}"])
    assert sweep == tmp_path / "slurm"
