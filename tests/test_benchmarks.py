"""The benchmark entry point runs end to end (tiny sizes); its numbers are reported, never asserted on."""
import json
import math
import subprocess
import sys

from conftest import ROOT


def test_smoke_suite_writes_every_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run-smoke.json").read_text())
    assert {"cpu", "threads", "torch"} <= set(result["machine"])
    assert "failed" not in result, result.get("failed")
    kinds = {row["kind"]: row["result"] for row in result["rows"]}
    assert set(kinds) == {"peak", "train", "sample", "eval", "data"}
    train = kinds["train"]
    assert train["images_per_s"] > 0 and train["peak_memory_mb"] > 0 and train["flops_per_step"] > 0
    sample = kinds["sample"]["4"]
    assert sample["none"]["images_per_s"] > 0 and 1 < sample["flop_bound"] < 2  # recompute every 2 of 4 steps
    assert all(math.isfinite(v) and v > 0 for v in (kinds["eval"]["feature_images_per_s"], kinds["data"]["images_per_s"]))
    markdown = (tmp_path / "run-smoke.md").read_text()
    assert markdown.strip() == proc.stdout.strip()
    for title in ("Training step", "Euler sampling", "Evaluation", "Latent cache reads"):
        assert title in markdown
