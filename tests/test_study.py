"""Issue 42, the local study: `launch.py -m +halving=on ...` runs successive halving as one command (ddt.study).

The config group's checks, then a real study of 4 splits x 2 seeds on digits at a tiny width (two rungs) and
the same grid trained to the last rung in one go, which it is compared with.
"""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, launch
from ddt import checkpoint
from ddt.config import config_id, run_subdir, validate
from ddt.errors import UsageError
from ddt.halving import decide_rung, read_decisions, study_cost
from ddt.ledger import read_json
from ddt.study import Point, Study, read_study, running, study_summary, train_commands
from test_status import status_json


@pytest.mark.parametrize("overrides, key", [
    (["halving.rungs=[20,10]"], "halving.rungs=[20,10] must be training steps, positive and increasing"),
    (["halving.rungs=[0,60]"], "halving.rungs=[0,60] must be training steps"),
    (["halving.rungs=[20.5,60]"], "halving.rungs=[20.5,60] is not a list of an integer"),
    (["halving.rungs=[20,60]", "halving.eta=1"], "halving.eta=1 is out of range: it must be >= 2"),
    (["halving.rungs=[20,60]", "halving.metric=lpips"], "halving.metric='lpips' is not one of fid, sfid, isc_mean"),
    ([], "halving.rungs is required here: pass halving.rungs=..."),
])
def test_a_bad_halving_setting_is_one_line_naming_its_key(compose, overrides, key):
    with pytest.raises(UsageError) as err:
        validate(compose("+halving=on", *overrides))
    (problem,) = err.value.problems
    assert key in problem and "\n" not in problem


def test_a_study_trains_each_configuration_as_one_multirun_over_its_seeds(tmp_path):
    points = [Point(f"model.encoder_depth={d},seed={s}", ["+halving=on", "halving.rungs=[20,60]", f"model.encoder_depth={d}",
                                                          f"seed={s}", "hydra.sweep.dir=x"], f"c{d}", s)
              for d in (2, 4) for s in (0, 1)]
    study = Study(tmp_path, [20, 60], 3, "fid", points)
    (cmd, members), _ = train_commands(study, points, 20)
    assert cmd[2:] == ["-m", "model.encoder_depth=2", "seed=0,1", "train.max_steps=20", f"hydra.sweep.dir='{tmp_path}'"]
    assert members == points[:2]
    single = Point("odd", ["model.encoder_depth=2", "seed=0"], "c2", 0)  # a folder the rule would not name so
    ((cmd, members),) = train_commands(study, [single], 60)
    assert cmd[2:] == ["model.encoder_depth=2", "seed=0", "train.max_steps=60", f"hydra.run.dir='{tmp_path / 'odd'}'"]


def test_halving_keys_enter_neither_config_id_nor_the_run_folder(compose):
    plain = validate(compose("model.encoder_depth=4")).to_dict()
    study = validate(compose("+halving=on", "halving.rungs=[20,60]", "halving.eta=2", "model.encoder_depth=4",
                             "train.max_steps=20")).to_dict()
    assert "halving" not in plain and study["halving"] == {"rungs": [20, 60], "eta": 2, "metric": "fid"}
    assert config_id(study) == config_id(plain)
    assert run_subdir(["+halving=on", "halving.rungs=[20,60]", "model.encoder_depth=4", "seed=1",
                       "train.max_steps=20"]) == "model.encoder_depth=4,seed=1"


# Digits at a tiny width. One seed: with two, the splits' FIDs at a few hundred steps stay within their seeds'
# intervals (t(0.975, 1) = 12.7) and the rule keeps every split (docs/halving.md, measured); with one, rank decides.
TINY = ["model.depth=6", "model.hidden_size=32", "model.num_heads=2", "train.batch_size=16", "eval.num_samples=100",
        "sampler.num_steps=4", "sampler.batch_size=100", "progress=false"]
SPLITS, SEEDS, RUNGS = "model.encoder_depth=1,2,4,5", "seed=0", (100, 200)


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under a folder: its mtime (ns) and bytes (the study's sweep_points.json aside: launch.py adds to it)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "sweep_points.json"}


def test_a_halving_study_runs_as_one_command_and_agrees_with_the_full_grid(tmp_path, cache_dir):
    study_dir, grid_dir = tmp_path / "study", tmp_path / "grid"
    command = ["-m", "+halving=on", f"halving.rungs=[{RUNGS[0]},{RUNGS[1]}]", SPLITS, SEEDS, *TINY,
               f"hydra.sweep.dir={study_dir}"]
    start = time.perf_counter()
    proc = launch(*command)
    study_wall = time.perf_counter() - start
    assert "every rung is through" in proc.stderr

    (first,) = read_decisions(study_dir).values()  # the last rung, the full length, is not a decision
    assert first.rung == RUNGS[0] and first.status == "decided" and first.pruned, first.to_json()
    study = read_study(study_dir)
    pruned = [p for p in study.points if p.config_id in first.pruned]
    survivors = [p for p in study.points if p.config_id in first.kept]
    code, status = status_json(study_dir)
    rows = {Path(r["run_dir"]).name: r for r in status["points"]}
    assert code == 0 and status["totals"]["states"] == {"completed": len(survivors), "pruned": len(pruned)}
    for p in pruned:  # the ledger says why, with the rung, value, interval, cut and rule
        h = rows[p.name]["halving"]
        assert rows[p.name]["state"] == "pruned" and rows[p.name]["step"] == RUNGS[0]
        assert h["rung"] == RUNGS[0] and h["rule"] == "cut" and h["cut"] == first.cut
        assert "rank 3 of 4" in h["reason"] or "rank 4 of 4" in h["reason"]
        assert h["value"] is not None and h["interval"] == "one seed" and "rank alone decides" in h["reason"]
    for p in survivors:  # extended in place to the last rung
        results = read_json(study_dir / p.name / "results.json")
        assert rows[p.name]["state"] == "completed" and results["train"]["step"] == RUNGS[1]
        assert [(c["step"], c["final"]) for c in results["curve"]] == [(RUNGS[0], False), (RUNGS[1], True)]
    text = subprocess.run([sys.executable, "-m", "ddt.status", str(study_dir)], cwd=ROOT, capture_output=True,
                          text=True).stdout
    assert "PRUNED" in text and f"pruned {pruned[0].name}: at rung {RUNGS[0]} (cut)" in text
    (cost_line,) = [line for line in text.splitlines() if line.startswith("device-hours:") and "full grid" in line]
    print(f"\nstudy in {study_wall:.0f} s:\n" + text[text.index("halving study"):])

    # the same command again, after the study: nothing trained, nothing decided, no file touched
    before = files_of(study_dir)
    again = launch(*command)
    assert "0 to train" in again.stderr and files_of(study_dir) == before
    decide = subprocess.run([sys.executable, "-m", "ddt.study", "decide", str(study_dir), "--rung", str(RUNGS[0])],
                            cwd=ROOT, capture_output=True, text=True)
    assert decide.returncode == 0 and files_of(study_dir) == before  # a SLURM decision job's call: read back

    # the full grid, every point trained to the last rung in one go
    start = time.perf_counter()
    launch("-m", SPLITS, SEEDS, *TINY, f"train.max_steps={RUNGS[1]}", f"hydra.sweep.dir={grid_dir}")
    grid_wall = time.perf_counter() - start
    one_go = checkpoint.load(grid_dir / survivors[0].name / "checkpoints" / "last.pt")
    extended = checkpoint.load(study_dir / survivors[0].name / "checkpoints" / "last.pt")
    for key, value in one_go["ema"].items():  # rung by rung in place = in one go, bit for bit
        assert torch.equal(extended["ema"][key], value), key
    grid = [{**read_json(d / "results.json"), "run_dir": str(d)} for d in sorted(grid_dir.iterdir()) if d.is_dir()]
    assert all(config_id(r["config"]) in {p.config_id for p in study.points} for r in grid)  # the same configurations
    grid_best = decide_rung(grid, RUNGS[1], metric="fid").best
    summary = study_summary(study_dir)
    labels, cost = summary["labels"], summary["cost"]
    full = study_cost(grid, RUNGS[1])
    print(f"best configuration: study {labels[summary['best']]}, full grid {labels[grid_best]} "
          f"({'the same' if grid_best == summary['best'] else 'NOT the same'}); wall time: study {study_wall:.0f} s, "
          f"full grid {grid_wall:.0f} s; device-hours: study {cost['spent']:.4f}, its estimate of the full grid "
          f"{cost['full_grid']:.4f}, the full grid measured {full['spent']:.4f}; {cost_line}")
    assert cost["saving"] > 0 and cost["full_grid"] > cost["spent"]

    # reviving a pruned configuration: its points go on at the next run of the command
    revive = subprocess.run([sys.executable, "-m", "ddt.study", "revive", str(study_dir), pruned[0].config_id],
                            cwd=ROOT, capture_output=True, text=True)
    assert revive.returncode == 0, revive.stderr
    assert {p.name for p in running(read_study(study_dir), RUNGS[1])} >= {p.name for p in pruned if p.config_id ==
                                                                          pruned[0].config_id}
    code, status = status_json(study_dir)
    assert code == 1 and status["totals"]["states"]["revived"] == 1


def test_sigterm_drop_and_revive_end_to_end(tmp_path, cache_dir):
    """SIGTERM to the study reaches the point it trains (saved, no process left); the same command resumes; a point
    the user drops leaves the decision; a revived configuration is extended in place by the next command."""
    import os
    import signal

    from ddt.lock import live_owner

    study_dir = tmp_path / "study"
    command = ["-m", "+halving=on", "halving.rungs=[40,60]", "halving.eta=2", "model.encoder_depth=1,3,5", SEEDS,
               *TINY, "train.ckpt_every=10", f"hydra.sweep.dir={study_dir}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *command], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        first = None
        while first is None and time.monotonic() < deadline:  # the first point has a checkpoint and trains on
            first = next((d for d in study_dir.glob("*seed=*") if (d / "checkpoints" / "last.pt").exists()
                          and live_owner(d) is not None), None)
            time.sleep(0.2)
        assert first is not None, "no point started training"
        owner = live_owner(first)
        proc.send_signal(signal.SIGTERM)  # the study's process alone, as scancel or kill would
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(owner["pid"], 0)  # the point stopped with the study, not left training alone
    assert read_json(first / "ledger.json")["events"][-1]["state"] == "interrupted"

    drop = subprocess.run([sys.executable, "-m", "ddt.study", "drop", str(study_dir), first.name], cwd=ROOT,
                          capture_output=True, text=True)
    assert drop.returncode == 0, drop.stderr
    again = launch(*command)  # resumes: the two others train to the rung, the decision leaves the dropped one out
    assert "every rung is through" in again.stderr, again.stderr[-3000:]
    (decision,) = read_decisions(study_dir).values()
    assert decision.dropped == [first.name] and decision.n == 2 and len(decision.pruned) == 2  # one cut, one dropped
    (cut,) = [c for c in decision.configs if c.rule == "cut"]
    revive = subprocess.run([sys.executable, "-m", "ddt.study", "revive", str(study_dir), cut.config_id], cwd=ROOT,
                            capture_output=True, text=True)
    assert revive.returncode == 0, revive.stderr
    launch(*command)  # the revived configuration goes on to the last rung, in place
    (revived,) = cut.runs
    results = read_json(study_dir / revived / "results.json")
    assert results["train"]["step"] == 60 and [c["step"] for c in results["curve"]] == [40, 60]
    code, status = status_json(study_dir)
    assert status["totals"]["states"] == {"completed": 2, "interrupted": 1}, status["totals"]
