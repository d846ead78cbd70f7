"""The benchmark entry point runs end to end (tiny sizes); its numbers are reported, never asserted on."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_smoke_suite_writes_every_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run-smoke.json").read_text())
    assert {"cpu", "threads", "torch"} <= set(result["machine"])
    assert "failed" not in result, result.get("failed")
    kinds = {row["kind"]: row["result"] for row in result["rows"]}
    assert set(kinds) == {"peak", "train", "sample", "eval", "data", "precision", "contention"}
    contention = kinds["contention"]  # a second process trained beside this one: both rates measured
    assert contention["alone_steps_per_s"] > 0 and contention["beside_steps_per_s"] > 0
    assert contention["neighbour_threads"] == 2 and contention["ratio_rounds"]["rounds"] == 1
    assert kinds["precision"]["fp32_s"] > 0 and kinds["precision"]["bf16_s"] > 0
    assert kinds["precision"]["speedup_rounds"]["rounds"] == 1
    train = kinds["train"]
    assert train["images_per_s"] > 0 and train["peak_memory_mb"] > 0 and train["flops_per_step"] > 0
    sample = kinds["sample"]["4"]
    assert sample["none"]["images_per_s"] > 0 and 1 < sample["flop_bound"] < 2  # recompute every 2 of 4 steps
    assert all(math.isfinite(v) and v > 0 for v in (kinds["eval"]["feature_images_per_s"], kinds["data"]["images_per_s"]))
    markdown = (tmp_path / "run-smoke.md").read_text()
    assert markdown.strip() == proc.stdout.strip()
    for title in ("Training step", "Euler sampling", "Evaluation", "Latent cache reads", "bf16 autocast against fp32",
                  "Training beside a second process"):
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


# A stand-in for the official module file (not shipped): the official constructor over our DDT, so the
# rows run here; with the real file (`--official PATH`) they compare the two implementations.
STAND_IN = '''
from ddt.models import DDT as _DDT


class DDT(_DDT):
    def __init__(self, in_channels, num_groups, hidden_size, num_blocks, num_encoder_blocks, patch_size, num_classes):
        super().__init__(in_channels=in_channels, patch_size=patch_size, hidden_size=hidden_size, num_heads=num_groups,
                         depth=num_blocks, encoder_depth=num_encoder_blocks, num_classes=num_classes)
'''


def test_round_ratios_divide_within_each_round():
    from benchmarks.run import round_ratios

    # rounds 1 and 2 ran at different machine speeds; each ratio is taken inside its round
    ratios = round_ratios({"official": [2.0, 4.0, 3.0], "ours": [1.0, 4.0, 2.0]}, "official", "ours")
    assert ratios == {"median": 1.5, "min": 1.0, "max": 2.0, "rounds": 3}


@pytest.mark.slow  # four compiles of a tiny model (about 2 minutes on 2 cores)
def test_official_rows_time_both_compiled_and_the_official_sampler_loop_matches_ours(tmp_path):
    from benchmarks.run import official_rows, report, run_one

    stand_in = tmp_path / "official.py"
    stand_in.write_text(STAND_IN)
    tiny = dict(model={**official_rows("x", "fp32")[1]["model"], "depth": 4, "encoder_depth": 2, "hidden_size": 32,
                       "num_heads": 2}, size=16, batch_size=4, official=str(stand_in), precision="fp32")
    rows = [dict(kind="official", name="tiny", repeats=2, peak_n=256, **tiny),
            dict(kind="official_sample", name="tiny", num_steps=6, every=3, cfg_scale=2.0, repeats=2, **tiny)]
    results = [{**row, "result": run_one(row, "cpu")} for row in rows]
    train, sampling = (r["result"] for r in results)
    for name in ("official", "official_compiled", "ours", "ours_compiled"):
        assert train[name]["seconds"] > 0 and 0 < train[name]["fraction_of_peak"]
    assert set(train["cold_compile_s"]) == {"ours_compiled", "official_compiled"}
    assert train["recompiles_after_warmup"] == 0 and sampling["recompiles_after_warmup"] == 0
    assert train["max_abs_diff"] == 0  # the stand-in is our model
    # the official loop (both halves every step, state refreshed every 3 steps) and ddt.sampling.sample
    # (uniform sharing at the same steps, the unguided t = 0 step on the cond half only) draw the same samples
    for key in ("none", "sharing"):
        assert sampling[f"max_abs_diff {key}"] < 1e-5 and sampling[f"speedup {key}"] > 0
    for rounds in (train["speedup_rounds"]["compiled"], train["speedup_rounds"]["eager"],
                   sampling["speedup_rounds none"], sampling["speedup_rounds sharing"]):
        assert rounds["rounds"] == 2 and 0 < rounds["min"] <= rounds["median"] <= rounds["max"]
    markdown = report({"machine": {"cpu": "x", "threads": 2, "torch": "2"}, "rows": [
        {"kind": "peak", "result": {"fp32": 1e11}}, *results]})
    assert "official compiled" in markdown and "official img/s" in markdown


def test_gemm_cache_sees_every_product_of_a_linear_step_with_its_layout():
    """The profiler's products of a Linear's forward + backward are the three the dispatch mode records."""
    from benchmarks.gemm_cache import ProductLayouts, products_in_step, rate_alone

    torch.manual_seed(0)
    linear, x = torch.nn.Linear(4, 3), torch.randn(8, 4, requires_grad=True)
    step = lambda: linear(x).square().mean().backward()  # noqa: E731
    with ProductLayouts() as layouts:
        step()
    in_step = products_in_step(step, 2)
    expected = {((8, 4), (4, 3)), ((8, 3), (3, 4)), ((3, 8), (8, 4))}  # forward, d input, d weight
    assert set(layouts.seen) == expected
    assert set(in_step) == expected
    assert all(cost["calls"] == 1 for cost in in_step.values())
    assert layouts.seen[(8, 4), (4, 3)][1] == (1, 4)  # the forward multiplies by the weight transposed
    assert rate_alone(((8, 4), (4, 3)), layouts.seen[(8, 4), (4, 3)], torch.ones(1024), seconds=0.01) > 0
