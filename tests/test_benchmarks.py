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

    # --only re-runs one kind of row and keeps the others
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--out", str(tmp_path),
                           "--only", "data"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = json.loads((tmp_path / "run-smoke.json").read_text())
    assert [row["kind"] for row in rerun["rows"]] == [k for k in kinds if k != "data"] + ["data"]
    kept = [row["result"] for row in result["rows"] if row["kind"] != "data"]
    assert [row["result"] for row in rerun["rows"][:-1]] == kept
    assert "--only data" in rerun["command"]


def test_flop_count_includes_cpu_attention():
    import torch
    import torch.nn.functional as F

    from benchmarks.flops import count_flops

    B, H, N, Dh = 2, 3, 16, 8
    q, k, v = (torch.randn(B, H, N, Dh, requires_grad=True) for _ in range(3))
    counted = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    # forward: QK^T and PV, 2·N·N·Dh multiply-adds each; backward: five such products
    assert counted == {"total": (2 + 5) * 2 * B * H * N * N * Dh, "attention": (2 + 5) * 2 * B * H * N * N * Dh}
