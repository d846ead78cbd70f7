"""The real quickstart study, exactly as a user runs it, against the untrained model (slow).

`python launch.py -m +experiment=quickstart_ratio` trains the quickstart at 7 encoder/decoder splits;
its 22en6de point is the default `python launch.py` run. CI runs the default and the study's deepest
encoder (22en6de, 24en4de) with the study's own config: two splits for the ratio report, in about half
the time 4en24de (the slowest run) added; the 7-point sweep itself is composed and checked in
test_experiments.py.
"""
import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, launch

DEPTHS = [22, 24]


@pytest.mark.slow
def test_quickstart_ratio_study_end_to_end(tmp_path, cache_dir):
    sweep = tmp_path / "quickstart_ratio"
    start = time.perf_counter()
    # Curve points on 100 samples instead of the study's 500 and 3 of the 7 splits keep CI short
    # (7 runs took 40 min of a 74-min CI on a slow day); KID is unbiased in the count.
    launch("-m", "+experiment=quickstart_ratio", "model.encoder_depth=" + ",".join(map(str, DEPTHS)),
           "eval.curve_num_samples=100", "progress=false", f"hydra.sweep.dir={sweep}")
    wall = time.perf_counter() - start
    launch("progress=false", "train.max_steps=0", f"hydra.run.dir={tmp_path / 'untrained'}")
    untrained = json.loads((tmp_path / "untrained" / "results.json").read_text())
    runs = {r["model"]["encoder_depth"]: r for r in
            (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))}
    assert sorted(runs) == DEPTHS
    for depth, r in runs.items():
        assert r["status"] == "completed" and r["train"]["step"] == r["config"]["train"]["max_steps"] == 500
        assert r["model"]["decoder_depth"] == 28 - depth and r["config"]["tags"] == ["encoder_ratio", "quickstart"]
        assert r["metrics"]["fid"] < untrained["metrics"]["fid"], depth
        assert [p["step"] for p in r["curve"]] == [100, 200, 300, 400, 500] and r["curve"][-1]["final"]
        assert [p["num_samples"] for p in r["curve"]] == [100, 100, 100, 100, 500]
    default = runs[22]  # = `python launch.py`
    assert default["curve"][0]["kid_mean"] > default["curve"][-1]["kid_mean"]  # step 100 is further from the data
    assert default["metrics"]["fid"] < 0.25 * untrained["metrics"]["fid"]
    assert default["metrics"]["isc_mean"] > untrained["metrics"]["isc_mean"]
    assert default["metrics"]["precision"] > untrained["metrics"]["precision"]

    report = subprocess.run([sys.executable, "-m", "analysis.report", str(sweep), "--out", str(tmp_path / "fig")],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "encoder/decoder ratio" in report and any((tmp_path / "fig").glob("*.png"))
    print(f"quickstart_ratio: {len(DEPTHS)} runs in {wall:.0f} s")
    for depth in DEPTHS:
        m = runs[depth]["metrics"]
        print(f"{depth}en{28 - depth}de  FID {m['fid']:.2f}  IS {m['isc_mean']:.2f}  "
              f"precision {m['precision']:.3f}  recall {m['recall']:.3f}  train {runs[depth]['train']['wall_time_s']:.0f} s")
    print(f"untrained FID {untrained['metrics']['fid']:.2f}  IS {untrained['metrics']['isc_mean']:.2f}")
    print(report)
