"""Issue 33: the report compares like with like — one step, no duplicate seeds, one study at a time.

The folder is the README's walkthrough on one `runs/quickstart/`: the quickstart run (500 steps, a curve
every 100 steps), a shorter sweep `model.encoder_depth=8,16,22 train.max_steps=60` whose 22en6de repeats
the quickstart's config and seed, a Heun and an Euler evaluation of the quickstart's checkpoint, and an
unrelated learning-rate study. results.json files are written by hand from the real composed config.
"""
import json
import logging
import re
import sys

import pandas as pd
import pytest

from analysis import plots
from analysis.compare import common_step, sampler_studies
from analysis.report import main as report_main
from analysis.results import load_curves, load_runs
from ddt.config import config_id, validate


@pytest.fixture
def plain(compose):
    """The resolved config of a command line (a real composition)."""
    return lambda *overrides: validate(compose(*overrides)).to_dict()  # as results.json records it


def write_run(run_dir, config, points, stages=("train", "sample", "evaluate"), config_id_recorded=None):
    """A completed results.json whose curve is `points` ({step: (fid, num_samples)}), the last one final."""
    steps = sorted(points)
    curve = [{"step": s, "fid": points[s][0], "isc_mean": 5.0, "kid_mean": 0.01, "num_samples": points[s][1],
              "final": s == steps[-1]} for s in steps]
    results = {"status": "completed", "run_dir": str(run_dir), "config": config, "stages": list(stages),
               "config_id": config_id_recorded or config_id(config), "model": {"parameters": 1},
               "train": {"step": steps[-1]}, "sample": {"step": steps[-1], "images_per_s": 10.0},
               "evaluate": {"num_samples": points[steps[-1]][1]},
               "metrics": {k: v for k, v in curve[-1].items() if k not in ("step", "num_samples", "final")},
               "curve": curve}
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def walkthrough(tmp_path, plain):
    root = tmp_path / "quickstart"
    quick = write_run(root / "default", plain("eval.every_steps=100", "eval.curve_num_samples=200"),
                      {100: (300.0, 200), 200: (200.0, 200), 300: (150.0, 200), 400: (120.0, 200), 500: (90.0, 500)})
    for depth, fid in ((8, 400.0), (16, 380.0), (22, 350.0)):
        write_run(root / f"model.encoder_depth={depth},train.max_steps=60",
                  plain(f"model.encoder_depth={depth}", "train.max_steps=60"), {60: (fid, 500)})
    ckpt = str(quick / "checkpoints" / "last.pt")
    for solver, fid in (("euler", 95.0), ("heun", 85.0)):
        write_run(root / f"ckpt=...,sampler={solver}", plain(f"sampler={solver}", f"ckpt={ckpt}", "stage=evaluate",
                                                             "sampler.num_steps=8"),
                  {500: (fid, 500)}, stages=("sample", "evaluate"))
    for depth, fid in ((8, 500.0), (16, 450.0)):  # another recipe: its own study, never pooled with the above
        write_run(root / f"model.encoder_depth={depth},train.lr=0.01",
                  plain(f"model.encoder_depth={depth}", "train.lr=0.01"), {500: (fid, 500)})
    return root


def test_max_steps_and_how_a_run_ran_leave_config_id_alone_but_not_the_recipe(plain):
    base = config_id(plain())
    assert config_id(plain("train.max_steps=60", "stage=evaluate", "train.log_every=1", "eval.every_steps=10")) == base
    assert config_id(plain("eval.num_samples=100")) != base  # FID's value depends on the sample count


def test_a_duplicate_counts_once_and_says_which_runs(walkthrough, caplog):
    with caplog.at_level(logging.WARNING, logger="analysis.results"):
        runs = load_runs(walkthrough)
    lines = [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()]
    assert len(lines) == 1 and "default" in lines[0] and "model.encoder_depth=22,train.max_steps=60" in lines[0]
    trained = plots.ratio_rows(runs)
    assert trained.groupby(["config_id", "seed"]).size().max() == 1  # one row per observation
    kept = trained[trained["run"].isin(["default", "model.encoder_depth=22,train.max_steps=60"])]
    assert kept["run"].tolist() == ["default"] and kept["step"].tolist() == [500]  # the one with more steps


def test_an_old_results_json_is_regrouped_on_load(tmp_path, plain):
    # the old rule hashed stage: a re-evaluated seed had its own config_id
    for seed, stage in ((0, "stage=[train,sample,evaluate]"), (1, "stage=evaluate")):
        write_run(tmp_path / "old" / f"seed={seed}", plain(f"seed={seed}", stage), {500: (90.0 + seed, 500)},
                  config_id_recorded=f"old{seed}")
    runs = load_runs(tmp_path / "old")
    assert runs["config_id"].nunique() == 1 and runs["config_id"].iloc[0] == config_id(plain())


def test_the_report_compares_at_one_step_and_reports_each_study_alone(walkthrough, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["analysis.report", str(walkthrough), "--out", str(tmp_path / "out")])
    report_main()
    out = capsys.readouterr().out
    assert "== studies in these folders" in out and "--query" in out
    # the default recipe at step 60: 8 and 16; 22en6de is the quickstart's 500-step run (the sweep's 60-step
    # repeat of it is a duplicate), whose curve has no point there: left out, by name, never its step 500
    assert "== encoder/decoder ratio at step 60, 500 samples per FID [train.lr=0.003] ==" in out
    assert "== best split at step 60, 500 samples per FID [train.lr=0.003] ==" in out
    best = out.split("== best split at step 60")[1].split("==")[1]
    assert "16en12de" in best and "380.0 " in best and "90.0" not in best
    assert re.search(r"left out \(no fid at step 60.*quickstart/default\b", out), out
    assert "(n=2)" not in out and "n=2" not in out  # never an interval from a duplicate
    assert "== encoder/decoder ratio at step 500, 500 samples per FID [train.lr=0.01] ==" in out
    heading = re.search(r"== sampling \(weights .*default/checkpoints/last.pt, step 500.*==", out)
    assert heading, out
    table = out.split(heading.group(0))[1].split("==")[0]
    assert re.search(r"^\s*heun\b.*\b85\.0", table, re.M) and re.search(r"^\s*euler\b.*\b95\.0", table, re.M)
    assert "solver" in table.splitlines()[1]  # a column for the sampler setting that differs
    status = out.split(f"== sweep status (python -m ddt.status {walkthrough}) ==")[1]  # the same table as ddt.status
    assert "totals: 8 completed" in status and "device-hours:" in status
    assert "device-hours:" in (tmp_path / "out" / "report.html").read_text()


def test_a_curve_is_the_curve_of_one_run(walkthrough):
    import matplotlib.pyplot as plt

    curves = load_curves(walkthrough, quiet=True)
    assert "model.encoder_depth=22,train.max_steps=60" not in set(curves["run"])  # the duplicate's curve is not joined
    for _, study in curves.groupby("train.lr"):
        fig, ax = plt.subplots()
        plots.fid_vs_step_axes(ax, plots.ratio_rows(study))
        for line in ax.get_lines():
            points = set(zip(line.get_xdata().tolist(), line.get_ydata().tolist()))
            owners = {run for run, s, f in study[["run", "step", "fid"]].itertuples(index=False) if (s, f) in points}
            assert len(owners) == 1, line.get_label()  # never two runs (of other lengths or recipes) on one line
        plt.close(fig)


def test_runs_without_a_common_step_are_left_out_with_their_names(walkthrough):
    curves = load_curves(walkthrough, quiet=True)
    study = plots.ratio_rows(curves[curves["train.lr"] == 0.003])
    late = study[study["run"] == "default"].assign(config_id="other-recipe-only-at-late-steps")
    place = common_step(pd.concat([study[study["run"] != "default"], late]))
    assert place.step == 60 and len(place.left_out) == 1 and "default" in place.left_out[0]


def test_a_sampler_study_compares_only_runs_that_sample_the_same_weights(walkthrough):
    runs = load_runs(walkthrough, quiet=True)
    found = sampler_studies(runs)
    assert len(found) == 1  # the other training runs sample their own weights: no sampler study among them
    heading, table, rows = found[0]
    assert sorted(rows["run"]) == ["ckpt=...,sampler=euler", "ckpt=...,sampler=heun", "default"]  # one checkpoint
    assert {"solver", "num_steps"} <= set(table.columns)  # every sampler setting that differs has a column
    assert sorted(zip(table["solver"], table["num_steps"])) == [("euler", 8), ("euler", 16), ("heun", 8)]


def test_sampling_a_run_checkpoint_again_with_its_own_settings_is_a_duplicate(walkthrough, plain, caplog):
    ckpt = str(walkthrough / "default" / "checkpoints" / "last.pt")
    write_run(walkthrough / "again", plain(f"ckpt={ckpt}", "stage=evaluate"), {500: (90.0, 500)},
              stages=("sample", "evaluate"))
    with caplog.at_level(logging.WARNING, logger="analysis.results"):
        runs = load_runs(walkthrough)
    assert "again" not in runs["run"].tolist() and "default" in runs["run"].tolist()  # the trained run is kept
    assert any("again" in r.getMessage() and "default" in r.getMessage() for r in caplog.records)


def test_too_few_samples_for_a_metric_are_named(plain):
    from ddt.runner import small_sample_warnings

    quickstart = plain()
    assert small_sample_warnings(quickstart, quickstart["eval"]["num_samples"]) == []  # 500 digits: enough
    lines = small_sample_warnings(quickstart, 10)
    assert len(lines) == 3 and lines[0].startswith("IS from 10 samples is 1 per split")
    assert any(line.startswith("KID subsets of 10") for line in lines) and "k=3" in lines[2]


def test_the_run_log_says_its_threads_and_warns_on_a_busy_machine(monkeypatch, caplog):
    import os

    import torch

    from ddt.threads import size_threads

    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * (os.cpu_count() or 1), 0.0, 0.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # a job given one CPU of the machine
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="ddt.runner"):
            assert size_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    text = caplog.text
    assert re.search(r"torch uses 1 threads on \d+ cores \(1 CPUs in this process's affinity mask\)", text)
    assert "OMP_NUM_THREADS=1" in text  # the busy machine's warning


@pytest.mark.parametrize("cpus,env,threads,why", [
    (8, {}, 8, "8 CPUs in this process's affinity mask"),
    (8, {"SLURM_CPUS_PER_TASK": "2"}, 2, "8 CPUs in this process's affinity mask, SLURM_CPUS_PER_TASK=2"),
    (2, {"SLURM_CPUS_PER_TASK": "16"}, 2, "2 CPUs in this process's affinity mask, SLURM_CPUS_PER_TASK=16"),
    (8, {"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "3"}, 3, "OMP_NUM_THREADS=3"),
    (8, {"OMP_NUM_THREADS": "4,2"}, 4, "OMP_NUM_THREADS=4,2"),
    (4, {"OMP_NUM_THREADS": "many"}, 4,
     "4 CPUs in this process's affinity mask; OMP_NUM_THREADS='many' is not a positive number, ignored"),
])
def test_threads_are_sized_from_what_the_process_may_use(monkeypatch, cpus, env, threads, why):
    """The affinity mask (taskset, cgroups, SLURM's binding) and SLURM_CPUS_PER_TASK, the smaller; OMP_NUM_THREADS
    overrides both."""
    import os

    from ddt.threads import thread_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert thread_count(env) == (threads, why)


def test_the_wandb_loaders_recompute_config_id_and_count_a_duplicate_once(plain, caplog):
    from analysis.results import wandb_curves, wandb_rows
    from ddt.tracking import flatten

    class Run:  # what analysis reads of a wandb.Api() run
        def __init__(self, name, config, step, fid, recorded_id):
            self.name, self.group, self.id = name, "quickstart-20261206", f"id-{name}"
            self.config = {**flatten(config), "config_id": recorded_id}  # the tracker logs it flat
            self.summary = {"status": "completed", "step": step, "fid": fid, "config_id": recorded_id}
            self._history = pd.DataFrame({"eval/step": [step], "eval/fid": [fid]})

        def history(self, keys=None, **_):
            return self._history[[k for k in keys if k in self._history]]

    runs = [Run("default", plain(), 500, 90.0, "old-rule-a"),
            Run("model.encoder_depth=22,train.max_steps=60", plain("train.max_steps=60"), 60, 350.0, "old-rule-b"),
            Run("seed=1,stage=evaluate", plain("seed=1", "stage=evaluate"), 500, 95.0, "old-rule-c")]
    with caplog.at_level(logging.WARNING, logger="analysis.results"):
        rows, curves = wandb_rows(runs), wandb_curves(runs, quiet=True)
    assert sorted(rows["run"]) == ["default", "seed=1,stage=evaluate"]  # the 60-step repeat counts once
    assert set(rows["config_id"]) == {config_id(plain())}  # recomputed: stage and max_steps no longer split them
    assert sum("duplicate" in r.getMessage() and "default" in r.getMessage() for r in caplog.records) == 1
    assert sorted(curves["run"].unique()) == ["default", "seed=1,stage=evaluate"] and 60 not in set(curves["step"])
