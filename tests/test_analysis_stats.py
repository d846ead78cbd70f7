"""analysis.stats and the curve loaders, figures and report on hand-written results (fast, no training)."""
import json
import math
import re
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis.report import main as report_main
from analysis.results import aggregate, load_curves, load_runs, separated, wandb_curves
from analysis.stats import separation_lines
from ddt.config import config_id

T_975_2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2): three seeds
T_975_1 = 12.706204736174707  # two seeds
DEPTHS = {8: {100: 300.0, 200: 200.0, 300: 150.0}, 22: {100: 295.0, 200: 120.0, 300: 80.0}}
SEED_OFFSETS = (0.0, 2.0, 7.0)  # per seed, so every step's three FIDs are x, x + 2, x + 7


def results_json(encoder_depth: int, seed: int, run_dir, curve: bool = True) -> dict:
    """A results.json as the runner writes it: nested config, stage sections, metrics, curve."""
    fids = {step: fid + SEED_OFFSETS[seed] for step, fid in DEPTHS[encoder_depth].items()}
    points = [{"step": step, "fid": fid, "isc_mean": 5.0 + seed, "isc_std": 0.2, "kid_mean": fid / 1000,
               "kid_std": 0.01, "precision": 0.3, "recall": 0.5, "f_score": 0.375,
               "num_samples": 500 if step == 300 else 200, "wall_time_s": 9.0 + seed, "final": step == 300}
              for step, fid in fids.items()]
    if encoder_depth == 8:  # this split ran without precision/recall at its intermediate points
        for point in points[:-1]:
            del point["precision"], point["recall"]
    config = {"name": "ratio", "stage": ["train", "sample", "evaluate"], "ckpt": None, "seed": seed,
              "model": {"preset": "S", "arch": "ddt", "depth": 28, "encoder_depth": encoder_depth,
                        "decoder_depth": 28 - encoder_depth, "hidden_size": 64},
              "sampler": {"name": "euler", "num_steps": 4, "sharing": "none", "cfg_interval": [0.0, 1.0]},
              "train": {"max_steps": 300, "batch_size": 32}, "eval": {"num_samples": 500, "every_steps": 100},
              "resolution": {"image_size": 16}, "data": {"name": "digits"},
              "logger": {"backend": "none", "mode": "offline" if seed else "online"}}
    out = {"status": "completed", "run_dir": str(run_dir), "config": config, "config_id": f"cfg{encoder_depth:09d}",
           "stages": ["train", "sample", "evaluate"], "model": {"parameters": 1000 + encoder_depth},
           "train": {"step": 300, "wall_time_s": 100.0 + seed, "images_per_s": 50.0, "final_loss": 0.1},
           "sample": {"step": 300, "wall_time_s": 5.0, "images_per_s": 100.0},
           "evaluate": {"num_samples": 500, "reference": "digits"},
           "metrics": {k: v for k, v in points[-1].items() if k not in ("step", "num_samples", "wall_time_s", "final")},
           "curve_cost": {"wall_time_s": 18.0, "run_wall_time_s": 130.0, "share": 0.14}}
    if curve:
        out["curve"] = points
    return out


@pytest.fixture
def sweep(tmp_path):
    """2 encoder depths x 3 seeds x 3 curve steps, plus a failed run that the loaders skip."""
    root = tmp_path / "ratio"
    for depth in DEPTHS:
        for seed in range(3):
            run_dir = root / f"model.encoder_depth={depth},seed={seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "results.json").write_text(json.dumps(results_json(depth, seed, run_dir)))
    failed = root / "model.encoder_depth=16"
    failed.mkdir()
    (failed / "results.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    return root


def test_aggregate_matches_hand_computed_mean_std_and_t_interval():
    df = pd.DataFrame({"model.encoder_depth": [8, 8, 8, 22], "seed": [2, 0, 1, 0], "fid": [10.0, 12.0, 17.0, 50.0],
                       "isc_mean": [1.0, np.nan, 3.0, 4.0], "run": ["a", "b", "c", "d"],
                       "train.wall_time_s": [5.0, 6.0, 7.0, 8.0], "step": 100})
    agg = aggregate(df).set_index("model.encoder_depth")
    assert len(agg) == 2 and agg.loc[8, "n"] == 3 and agg.loc[8, "seeds"] == [0, 1, 2]
    assert agg.loc[8, "fid_mean"] == pytest.approx(13.0)
    assert agg.loc[8, "fid_std"] == pytest.approx(math.sqrt(13))
    assert agg.loc[8, "fid_ci95"] == pytest.approx(T_975_2 * math.sqrt(13) / math.sqrt(3))
    # NaN values are left out per metric: IS of split 8 rests on two seeds
    assert agg.loc[8, "isc_mean_n"] == 2 and agg.loc[8, "fid_n"] == 3
    assert agg.loc[8, "isc_mean_ci95"] == pytest.approx(T_975_1 * math.sqrt(2) / math.sqrt(2))
    # one seed: no spread and no interval, never 0
    assert agg.loc[22, "n"] == 1 and agg.loc[22, "fid_mean"] == 50.0
    assert math.isnan(agg.loc[22, "fid_std"]) and math.isnan(agg.loc[22, "fid_ci95"])
    assert "run" not in agg and "train.wall_time_s" not in agg and "seed" not in agg


def test_aggregate_groups_by_config_id_when_every_row_has_one():
    df = pd.DataFrame({"config_id": ["x", "x", "y"], "seed": [0, 1, 0], "fid": [1.0, 3.0, 5.0],
                       "logger.mode": ["online", "offline", "online"], "model.encoder_depth": [8, 8, 8]})
    agg = aggregate(df).set_index("config_id")
    assert agg.loc["x", "n"] == 2 and agg.loc["x", "fid_mean"] == 2.0 and agg.loc["y", "n"] == 1
    assert agg.loc["x", "model.encoder_depth"] == 8 and pd.isna(agg.loc["x", "logger.mode"])  # not shared
    # without a config_id on every row, the config columns decide (logger.mode then splits x, joins y)
    fallback = aggregate(df.assign(config_id=["x", None, "y"])).set_index("logger.mode")
    assert fallback.loc["online", "n"] == 2 and fallback.loc["offline", "n"] == 1


def test_aggregate_of_a_curve_frame_gives_one_row_per_setting_and_step(sweep):
    agg = aggregate(load_curves(sweep))
    assert len(agg) == 6 and (agg["n"] == 3).all()
    assert agg[["model.encoder_depth", "step"]].values.tolist() == [[8, 100], [8, 200], [8, 300],
                                                                     [22, 100], [22, 200], [22, 300]]
    row = agg.iloc[0]  # FIDs 300, 302, 307
    assert row["fid_mean"] == pytest.approx(303.0) and row["fid_std"] == pytest.approx(math.sqrt(13))
    assert row["fid_ci95"] == pytest.approx(T_975_2 * math.sqrt(13) / math.sqrt(3))
    assert row["precision_n"] == 0 and math.isnan(row["precision_mean"])  # split 8 had none before the end
    assert agg.iloc[2]["precision_n"] == 3 and agg.iloc[2]["seeds"] == [0, 1, 2]
    # recomputed from each config on load (the recorded ids are an older rule's); the seeds still share one
    ids = [config_id(results_json(depth, 0, sweep)["config"]) for depth in (8, 22)]
    assert agg["config_id"].tolist() == [ids[0]] * 3 + [ids[1]] * 3 and ids[0] != ids[1]


def test_load_curves_reads_every_point_with_the_flattened_config(sweep):
    curves = load_curves(sweep)
    assert len(curves) == 18 and curves["group"].eq("ratio").all()
    assert {"model.encoder_depth", "seed", "run", "run_dir", "config_id", "step", "fid", "isc_mean", "kid_mean",
            "precision", "recall", "num_samples", "final", "wall_time_s"} <= set(curves.columns)
    one = curves[curves["run"] == "model.encoder_depth=22,seed=1"]
    assert one["step"].tolist() == [100, 200, 300] and one["final"].tolist() == [False, False, True]
    assert one["fid"].tolist() == [297.0, 122.0, 82.0] and one["num_samples"].tolist() == [200, 200, 500]
    final = curves[curves["final"]].set_index("run")
    runs = load_runs(sweep).set_index("run")
    assert final.loc[runs.index, "fid"].tolist() == runs["fid"].tolist()  # the final point = the metrics
    assert curves.loc[curves["model.encoder_depth"] == 8, "precision"].isna().sum() == 6


def test_a_results_json_without_curve_is_one_final_point(tmp_path):
    run_dir = tmp_path / "old" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results_json(22, 0, run_dir, curve=False)))
    curves = load_curves(tmp_path / "old")
    assert len(curves) == 1 and curves["step"].tolist() == [300] and curves["final"].tolist() == [True]
    assert curves["fid"].tolist() == [80.0] and curves["num_samples"].tolist() == [500]


def test_separated_tells_clear_differences_from_overlapping_intervals():
    df = pd.DataFrame({"model.depth": 28, "model.encoder_depth": [4] * 3 + [8] * 3 + [12] * 3 + [16],
                       "seed": [0, 1, 2] * 3 + [0], "step": 100,
                       "fid": [100, 101, 102, 50, 51, 52, 49, 53, 57, 10]})
    pairs = separated(aggregate(df), by="model.encoder_depth", metric="fid")
    verdict = {(r["a"], r["b"]): r["differ"] for r in pairs.to_dict("records")}
    assert verdict[(4, 8)] and verdict[(4, 12)]  # 101 ± 2.5 vs 51 ± 2.5 and 53 ± 9.9: apart
    assert not verdict[(8, 12)]  # 51 ± 2.5 vs 53 ± 9.9: overlap
    assert not verdict[(4, 16)] and not verdict[(12, 16)]  # one seed: no interval, no claim
    assert set(pairs["verdict"]) == {"differ", "not distinguishable at this n"}
    lines = separation_lines(pairs, "FID", label=lambda e, context: plots.split_name(e, context["model.depth"]))
    assert lines[0].startswith("FID: 2 of 6 pairs differ")
    assert any("4en24de" in line and "8en20de" in line and "8en20de is lower" in line for line in lines)
    assert lines[-1] == "  [model.depth=28, step=100] one seed, so no interval: every pair with 16en12de is " \
                        "not distinguishable at this n"


def test_separated_compares_splits_only_within_one_model_size_and_step(sweep):
    pairs = separated(aggregate(load_curves(sweep)), by="model.encoder_depth")
    assert len(pairs) == 3 and pairs["step"].tolist() == [100, 200, 300]  # model.decoder_depth follows from `by`
    assert pairs["differ"].tolist() == [False, True, True]  # 303 ± 9 vs 298 ± 9, then 203 vs 123, 153 vs 83


def test_fid_vs_step_draws_a_band_over_seeds_and_none_for_one_seed(sweep):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    curves = load_curves(sweep)
    for frame, bands in ((curves, 2), (curves[curves["seed"] == 0], 0)):
        fig, ax = plt.subplots()
        plots.fid_vs_step_axes(ax, frame)
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == bands
        assert len(ax.get_lines()) == 2  # one mean line per split
        plt.close(fig)


def test_ratio_table_shows_mean_and_interval_only_for_several_seeds(sweep):
    runs = load_runs(sweep)
    table = plots.ratio_table(runs)
    assert len(table) == 2 and re.fullmatch(r"\d+\.\d{3} ± \d+\.\d{3} \(n=3\)", table["fid"].iloc[0])
    single = plots.ratio_table(runs[runs["seed"] == 0])
    assert single["fid"].tolist() == [150.0, 80.0]  # plain numbers


def test_report_cli_writes_a_self_contained_html_page(sweep, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["analysis.report", str(sweep), "--out", str(out)])
    report_main()
    stdout = capsys.readouterr().out
    assert "== encoder/decoder ratio at step 300, 500 samples per FID ==" in stdout and "±" in stdout and "(n=3)" in stdout
    assert "beyond their 95% intervals" in stdout and "22en6de is lower" in stdout
    assert "FID vs training step" in stdout
    page = (out / "report.html").read_text()
    assert f"report: {out / 'report.html'}" in stdout
    assert page.count("data:image/png;base64,") == 2 and "±" in page and "<table" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I) and "<link" not in page
    assert "<script" not in page
    assert (out / "encoder_ratio.png").exists() and (out / "fid_vs_step.png").exists()


def test_report_prints_no_ratio_tables_for_a_single_encoder_depth(tmp_path, capsys):
    from analysis.report import report

    rows = [{"model.preset": "S", "model.depth": 28, "model.encoder_depth": 22, "model.arch": "ddt",
             "ckpt": "/ckpt/last.pt", "stage": ["sample", "evaluate"], "seed": 0, "step": 10,
             "sampler.sharing": sharing, "sampler.num_recompute": 2, "sample.num_recompute": 2,
             "sample.images_per_s": speed,
             "fid": fid, "isc_mean": 5.0, "run": sharing, "group": "sharing"}
            for sharing, speed, fid in (("none", 10.0, 100.0), ("uniform", 20.0, 110.0), ("dp", 20.0, 105.0))]
    paths = report(pd.DataFrame(rows), tmp_path)
    stdout = capsys.readouterr().out
    assert "encoder/decoder ratio" not in stdout and "best split" not in stdout and "== sampling (weights /ckpt/last.pt" in stdout
    assert set(paths) == {"sharing_speed", "report.html"}


class FakeRun:
    """What analysis reads of a wandb.Api() run: config, summary, names and a history DataFrame."""

    def __init__(self, name, config, history):
        self.name, self.group, self.id = name, "ratio-20261201", f"id-{name}"
        self.config, self.summary, self._history = config, {"status": "completed", "fid": 1.0}, history

    def history(self, keys=None, **_):
        frame = self._history
        return frame if keys is None else frame[[k for k in ["_step", *keys] if k in frame]]


def test_wandb_curves_reads_eval_points_from_history():
    nan = np.nan
    runs = []
    for seed in range(2):
        history = pd.DataFrame({  # train/loss rows between the evaluations, as W&B keeps them
            "_step": [0, 1, 2, 3, 4, 5],
            "train/loss": [1.0, nan, 0.8, nan, 0.6, nan],
            "eval/step": [nan, 100, nan, 200, nan, 300],
            "eval/fid": [nan, 50.0 + seed, nan, 30.0 + seed, nan, 20.0 + seed],
            "eval/kid_mean": [nan, 0.05, nan, 0.03, nan, 0.02],
            "eval/precision": [nan, nan, nan, nan, nan, 0.4],  # only the final point
            "eval/num_samples": [nan, 200, nan, 200, nan, 500]})
        config = {"model.encoder_depth": 8, "model.depth": 28, "model.preset": "S", "seed": seed,
                  "config_id": "abc123abc123", "_wandb": {"x": 1}}
        runs.append(FakeRun(f"run{seed}", config, history))
    runs.append(FakeRun("no-eval", {"model.encoder_depth": 8, "seed": 9, "config_id": "abc123abc123"},
                        pd.DataFrame({"_step": [0], "train/loss": [1.0]})))
    curves = wandb_curves(runs)
    assert len(curves) == 6 and "_wandb" not in curves and curves["wandb_id"].iloc[0] == "id-run0"
    first = curves[curves["run"] == "run1"]
    assert first["step"].tolist() == [100, 200, 300] and first["fid"].tolist() == [51.0, 31.0, 21.0]
    assert first["final"].tolist() == [False, False, True] and first["num_samples"].tolist() == [200, 200, 500]
    assert first["precision"].isna().tolist() == [True, True, False] and first["recall"].isna().all()
    agg = aggregate(curves)
    assert agg["step"].tolist() == [100, 200, 300] and (agg["n"] == 2).all()
    assert agg["fid_mean"].tolist() == [50.5, 30.5, 20.5]


def test_wandb_report_has_fid_and_kid_curves_grouped_by_encoder_depth():
    from analysis.wandb_report import build_report

    panels = build_report("me", "ddt-ablations", "g").blocks[1].panels
    by_title = {p.title: p for p in panels}
    for title, metric in (("FID vs training step", "eval/fid"), ("sFID vs training step", "eval/sfid"),
                          ("KID vs training step", "eval/kid_mean")):
        panel = by_title[title]
        assert type(panel).__name__ == "LinePlot" and panel.x == "eval/step" and panel.y == [metric]
        assert panel.groupby_aggfunc == "mean" and panel.groupby_rangefunc == "stderr"
        config = panel._to_model().config  # what is sent to W&B: the flat config key of the logger
        assert config.group_by == "model.encoder_depth.value" and config.aggregate
