"""The paper-layout table of analysis.report: the ADM evaluator's five metrics per row, and the published
numbers of tests/reference/paper_numbers.md beside the rows whose recipe and step match a paper row."""
import re

import numpy as np
import pandas as pd
import pytest

from analysis import paper, plots
from conftest import REFERENCE


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after `heading`."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start + 2:end]]


def test_the_published_numbers_equal_the_reference_file():
    text = (REFERENCE / "paper_numbers.md").read_text()
    for model, split, *fids, isc in markdown_table(text, "## Encoder/decoder ratio"):
        preset, encoder = model.removeprefix("DDT-").removesuffix("/2"), int(split.split("en")[0])
        assert paper.RATIO_FID[(preset, encoder)] == dict(zip((100_000, 200_000, 300_000, 400_000), map(float, fids)))
        assert paper.RATIO_IS_400K[(preset, encoder)] == float(isc)
    for size, sit, repa, improved_sit, improved_repa, ddt in markdown_table(text, "## Table 2"):
        preset = size.removesuffix("/2")
        for name, cell in (("Improved-SiT", improved_sit), ("Improved-REPA", improved_repa), ("DDT", ddt)):
            fid, isc = (float(v) for v in re.findall(r"[\d.]+", cell)[:2])
            assert paper.TABLE2[(preset, name)] == (fid, isc)
        if "naive" in ddt:
            assert paper.TABLE2[(preset, "naive DDT")] == tuple(map(float, re.findall(r"† ([\d.]+) / ([\d.]+)", ddt)[0]))


def run_row(encoder_depth: int, seed: int, step: int, fid: float, **config) -> dict:
    row = {"model.preset": "B", "model.depth": 12, "model.patch_size": 2, "model.arch": "ddt", "model.norm": "rmsnorm",
           "model.encoder_depth": encoder_depth, "repa.enabled": True, "data.name": "imagenet_latents",
           "resolution.image_size": 256, "sampler.num_steps": 250, "sampler.cfg_scale": 1.0,
           "sampler.cfg_interval": [0.0, 1.0], "seed": seed, "step": step, "config_id": f"b{encoder_depth}-{step}",
           "run": f"e{encoder_depth}s{seed}", "fid": fid, "sfid": 5.0 + seed, "isc_mean": 80.0 + seed,
           "precision": 0.7, "recall": 0.6 + 0.01 * seed}
    row.update(config)
    return row


def test_the_paper_table_has_the_five_metrics_over_seeds_and_the_matching_published_row():
    runs = pd.DataFrame([run_row(8, 0, 400_000, 16.0), run_row(8, 1, 400_000, 17.0),
                         run_row(4, 0, 300_000, 21.0),
                         run_row(8, 0, 50_000, 40.0, config_id="b8-50k"),  # no published point at 50K
                         run_row(8, 0, 400_000, 9.0, config_id="digits", **{"data.name": "digits",
                                                                            "resolution.image_size": 16})])
    table = plots.paper_table(runs).set_index(["model", "step"])
    assert {"FID", "sFID", "IS", "Prec", "Rec", "paper FID", "paper IS", "paper row"} <= set(table.columns)
    both = table.loc[("B/2 8en4de", 400_000)]
    both = both[both["paper FID"].notna()].iloc[0]
    assert both["FID"].startswith("16.500 ± ") and both["FID"].endswith("(n=2)")  # mean of the two seeds
    assert both["sFID"].startswith("5.500 ± ") and both["paper FID"] == 16.32 and both["paper IS"] == 85.94
    assert "Figures 7-8 at 400K" in both["paper row"]
    assert table.loc[("B/2 4en8de", 300_000), "paper FID"] == 20.13
    assert np.isnan(table.loc[("B/2 4en8de", 300_000), "paper IS"])  # the paper gives IS at 400K only
    assert pd.isna(table.loc[("B/2 8en4de", 50_000), "paper row"])
    assert (table["paper FID"].isna()).sum() == 2  # the 50K point and the digits run


@pytest.mark.parametrize("config,expected", [
    ({"model.arch": "sit", "repa.enabled": False}, (25.1, 58.8)),
    ({"model.arch": "sit"}, (19.1, 76.5)),
    ({"model.norm": "layernorm"}, (21.1, 73.0)),
    ({}, (16.32, 85.94)),  # DDT-B/2 8en4de: the ratio figure's point (Table 2 rounds its IS to 86.0)
    ({"repa.enabled": False}, None),  # DDT without REPA is no row of the paper
    ({"sampler.num_steps": 50}, None),
])
def test_table2_rows_are_matched_by_recipe(config, expected):
    row = run_row(8, 0, 400_000, 20.0, **config)
    found = paper.published(row)
    assert (found and (found["paper_fid"], found["paper_isc"])) == (expected or None)


def test_the_system_level_row_needs_the_guidance_of_the_paper():
    row = run_row(22, 0, 1_281_200, 1.5, **{"model.preset": "XL", "model.depth": 28, "sampler.cfg_scale": 2.0,
                                            "sampler.cfg_interval": [0.3, 1.0]})
    assert paper.published(row)["paper_fid"] == 1.31
    assert paper.published({**row, "sampler.cfg_interval": [0.0, 1.0]}) is None
