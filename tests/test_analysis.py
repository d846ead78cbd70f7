"""analysis/: the results loaders, the report CLI and the notebooks on a real 3-point quickstart sweep."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from analysis.results import load_runs, wandb_rows
from analysis.wandb_offline import offline_runs
from conftest import ROOT, launch

BUDGET = ["train.max_steps=10", "train.batch_size=32", "train.ckpt_every=5", "eval.num_samples=60",
          "sampler.num_steps=4", "sampler.batch_size=60", "progress=false", "logger=wandb", "logger.mode=offline",
          "logger.project=ddt-test", "logger.grid_size=4"]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, cache_dir):
    """A real -m sweep over model.encoder_depth=8,16,22 and a sampler sweep over its 22en6de checkpoint."""
    root = tmp_path_factory.mktemp("sweeps")
    ratio, sampling = root / "quickstart", root / "sharing"
    launch("-m", "model.encoder_depth=8,16,22", *BUDGET, f"hydra.sweep.dir={ratio}")
    (run_22,) = ratio.glob("*model.encoder_depth=22*")  # folder named after all of the run's overrides
    ckpt = run_22 / "checkpoints" / "last.pt"
    launch("-m", "stage=evaluate", f"ckpt='{ckpt}'",  # quoted: the path holds '='
           "sampler.sharing=none,uniform,dp", "sampler.num_recompute=2",
           *BUDGET, f"hydra.sweep.dir={sampling}")
    return ratio, sampling


def test_load_runs_reads_every_point_of_the_sweep(sweeps):
    ratio, _ = sweeps
    df = load_runs(ratio)
    assert df["model.encoder_depth"].tolist() == [8, 16, 22]
    assert (df["step"] == 10).all() and df["group"].eq("quickstart").all()
    for row in df.to_dict("records"):
        results = json.loads((ratio / row["run"] / "results.json").read_text())
        assert row["fid"] == results["metrics"]["fid"] and row["model.decoder_depth"] == 28 - row["model.encoder_depth"]
    assert np.isfinite(df[["fid", "isc_mean", "precision", "recall"]].to_numpy()).all()


def test_the_wandb_loader_gives_the_same_rows_from_the_runs_wandb_recorded(sweeps):
    ratio, _ = sweeps
    local = load_runs(ratio).set_index("run")
    remote = wandb_rows(offline_runs(ratio)).set_index("run")
    assert sorted(remote.index) == sorted(local.index) and remote["group"].nunique() == 1
    shared = ["model.encoder_depth", "model.depth", "sampler.num_steps", "fid", "isc_mean", "precision", "recall",
              "step", "train.images_per_s"]
    assert set(shared) <= set(remote.columns)
    for column in shared:
        assert remote.loc[local.index, column].tolist() == pytest.approx(local[column].tolist()), column


def test_notebooks_execute_end_to_end_and_save_their_figures(sweeps, tmp_path):
    import papermill

    ratio, sampling = sweeps
    for notebook, sweep, figures in (("encoder_decoder_ratio", ratio, ["encoder_ratio", "fid_vs_step"]),
                                     ("sampling", sampling, ["sharing_speed"])):
        out = tmp_path / notebook
        papermill.execute_notebook(str(ROOT / "analysis" / f"{notebook}.ipynb"), str(tmp_path / f"{notebook}.ipynb"),
                                   parameters={"sweep_dirs": [str(sweep)], "out_dir": str(out)}, cwd=str(ROOT),
                                   kernel_name="python3", progress_bar=False)
        for name in figures:
            assert (out / f"{name}.png").stat().st_size > 10_000 and (out / f"{name}.pdf").exists(), name
    assert list((tmp_path / "sampling").glob("dp_schedule_*.png"))  # the dp schedule over its similarity matrix


def test_report_cli_prints_the_tables_and_writes_the_figures(sweeps, tmp_path):
    ratio, sampling = sweeps
    proc = subprocess.run([sys.executable, "-m", "analysis.report", str(ratio), str(sampling), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert "best split" in proc.stdout and re.search(r"\b(8en20de|16en12de|22en6de)\b", proc.stdout)
    assert (tmp_path / "encoder_ratio.png").exists() and (tmp_path / "sharing_speed.png").exists()


def test_wandb_report_panels_use_the_logged_columns():
    from analysis.wandb_report import build_report

    report = build_report("me", "ddt-ablations", "quickstart-20261125-212801")
    grid = report.blocks[1]
    names = [type(p).__name__ for p in grid.panels]
    assert names == ["ScatterPlot", "ScatterPlot", "ParallelCoordinatesPlot", "LinePlot", "MediaBrowser"]
    assert grid.panels[0].x.name == "model.encoder_depth" and grid.panels[0].y.name == "fid"
