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
    """A real seeded -m sweep (model.encoder_depth=8,22 x seed=0,1, a curve point every 5 steps), a
    sampler sweep over one 22en6de checkpoint and a small few-step sweep over the same checkpoint."""
    root = tmp_path_factory.mktemp("sweeps")
    ratio, sampling, steps = root / "quickstart", root / "sharing", root / "few_step"
    launch("-m", "model.encoder_depth=8,22", "seed=0,1", "eval.every_steps=5", *BUDGET, f"hydra.sweep.dir={ratio}")
    (run_22,) = ratio.glob("*model.encoder_depth=22,*,seed=0,*")  # folder named after all of the run's overrides
    ckpt = run_22 / "checkpoints" / "last.pt"
    launch("-m", "stage=evaluate", f"ckpt='{ckpt}'",  # quoted: the path holds '='
           "sampler.sharing=none,uniform,dp", "sampler.num_recompute=2",
           *BUDGET, f"hydra.sweep.dir={sampling}")
    launch("-m", "+experiment=few_step", f"ckpt='{ckpt}'", *BUDGET, "few_step_solver=euler,adams2,heun",
           "sampler.num_steps=2,3", "sampler.timeshift=2.0", f"hydra.sweep.dir={steps}")  # after BUDGET's num_steps
    return ratio, sampling, steps


def test_load_runs_reads_every_point_of_the_sweep(sweeps):
    ratio, *_ = sweeps
    df = load_runs(ratio)
    assert df["model.encoder_depth"].tolist() == [8, 8, 22, 22] and sorted(df["seed"]) == [0, 0, 1, 1]
    assert df.groupby("model.encoder_depth")["config_id"].nunique().eq(1).all() and df["config_id"].nunique() == 2
    assert (df["step"] == 10).all() and df["group"].eq("quickstart").all()
    for row in df.to_dict("records"):
        results = json.loads((ratio / row["run"] / "results.json").read_text())
        assert row["fid"] == results["metrics"]["fid"] and row["model.decoder_depth"] == 28 - row["model.encoder_depth"]
    assert np.isfinite(df[["fid", "isc_mean", "precision", "recall"]].to_numpy()).all()


def test_the_wandb_loader_gives_the_same_rows_from_the_runs_wandb_recorded(sweeps):
    ratio, *_ = sweeps
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

    ratio, sampling, steps = sweeps
    for notebook, sweep, figures in (("encoder_decoder_ratio", ratio, ["encoder_ratio", "fid_vs_step"]),
                                     ("sampling", sampling, ["sharing_speed", "few_step"])):
        out = tmp_path / notebook
        papermill.execute_notebook(str(ROOT / "analysis" / f"{notebook}.ipynb"), str(tmp_path / f"{notebook}.ipynb"),
                                   parameters={"sweep_dirs": [str(sweep)], "out_dir": str(out),
                                               "few_step_dirs": [str(steps)]}, cwd=str(ROOT),
                                   kernel_name="python3", progress_bar=False)
        for name in figures:
            assert (out / f"{name}.png").stat().st_size > 10_000 and (out / f"{name}.pdf").exists(), name
    assert list((tmp_path / "sampling").glob("dp_schedule_*.png"))  # the dp schedule over its similarity matrix


def test_report_cli_prints_the_tables_and_writes_the_figures(sweeps, tmp_path):
    ratio, sampling, _ = sweeps
    proc = subprocess.run([sys.executable, "-m", "analysis.report", str(ratio), str(sampling), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert "best split" in proc.stdout and re.search(r"\b(8en20de|16en12de|22en6de)\b", proc.stdout)
    assert (tmp_path / "encoder_ratio.png").exists() and (tmp_path / "sharing_speed.png").exists()
    assert "±" in proc.stdout  # two seeds per split: mean ± ci95
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "±" in page and not re.search(r"(src|href)=\"https?:", page)


def test_the_report_of_a_missing_folder_is_one_line_naming_it(tmp_path):
    """As ddt.status says it: one line naming the folder, exit 2, no traceback (also for a file given as folder)."""
    (tmp_path / "a_file").write_text("not a sweep")
    for folder in (tmp_path / "nowhere", tmp_path / "a_file"):
        for command in ("analysis.report", "ddt.status"):
            proc = subprocess.run([sys.executable, "-m", command, str(folder)], cwd=ROOT, capture_output=True,
                                  text=True)
            assert proc.returncode == 2 and proc.stdout == "", (command, proc.stdout, proc.stderr)
            (line,) = proc.stderr.splitlines()
            assert line.startswith(f"{command}: error: {folder} ") and "runs/quickstart" in line, line


def test_curves_of_the_seeded_sweep_aggregate_per_split_and_step_and_draw_bands(sweeps):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from scipy import stats

    from analysis import plots
    from analysis.results import aggregate, load_curves

    ratio, *_ = sweeps
    curves = load_curves(ratio)
    assert sorted(curves.groupby("run")["step"].apply(list).map(tuple).unique()) == [(5, 10)]
    agg = aggregate(curves, over="seed")
    assert len(agg) == 4 and (agg["n"] == 2).all()  # 2 splits x 2 steps, 2 seeds each
    for row in agg.to_dict("records"):
        fids = curves[(curves["model.encoder_depth"] == row["model.encoder_depth"])
                      & (curves["step"] == row["step"])]["fid"].to_numpy()
        assert row["fid_mean"] == pytest.approx(fids.mean())
        assert row["fid_ci95"] == pytest.approx(stats.t.ppf(0.975, 1) * fids.std(ddof=1) / np.sqrt(2))
    fig, ax = plt.subplots()
    plots.fid_vs_step_axes(ax, curves)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # one band per split
    plt.close(fig)


def test_wandb_report_panels_use_the_logged_columns():
    from analysis.wandb_report import build_report

    report = build_report("me", "ddt-ablations", "quickstart-20261125-212801")
    grid = report.blocks[1]
    names = [type(p).__name__ for p in grid.panels]
    assert names == ["ScatterPlot", "ScatterPlot", "ParallelCoordinatesPlot", "LinePlot", "LinePlot", "LinePlot",
                     "LinePlot", "MediaBrowser"]  # loss, FID, sFID and KID against the step
    assert grid.panels[0].x.name == "model.encoder_depth" and grid.panels[0].y.name == "fid"


def test_the_few_step_frame_reads_nfe_and_labels_from_the_runs(sweeps):
    from analysis.few_step import load_few_step, recommendations

    *_, steps = sweeps
    df = load_few_step(steps)
    assert sorted(zip(df["solver"], df["num_steps"], df["nfe"])) == [
        ("adams 2", 2, 2.0), ("adams 2", 3, 3.0), ("euler", 2, 2.0), ("euler", 3, 3.0), ("heun", 2, 3.0), ("heun", 3, 5.0)]
    best = recommendations(df, budgets=(3,))
    winner = df.loc[df.loc[df["nfe"] == 3, "fid"].idxmin()]
    assert len(best) == 1 and (best["solver"].iloc[0], best["num_steps"].iloc[0]) == (winner["solver"], winner["num_steps"])
    assert best["fid"].iloc[0] == f"{winner['fid']:.1f} (n=1)" and not best["apart"].iloc[0]  # one seed: no claim
