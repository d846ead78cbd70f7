"""The DDT paper's published numbers (../shared/reference/paper_numbers.md), to draw beside ours."""
from __future__ import annotations

# Figures 7-8 (no CFG, ImageNet 256, FID-50K): FID by training step for each encoder/decoder split.
RATIO_FID = {
    ("B", 4): {100_000: 31.40, 200_000: 22.80, 300_000: 20.13, 400_000: 18.61},
    ("B", 6): {100_000: 27.61, 200_000: 20.42, 300_000: 17.95, 400_000: 16.86},
    ("B", 8): {100_000: 27.12, 200_000: 19.90, 300_000: 17.78, 400_000: 16.32},
    ("B", 10): {100_000: 29.70, 200_000: 21.75, 300_000: 18.95, 400_000: 17.65},
    ("L", 10): {100_000: 15.17, 200_000: 10.40, 300_000: 9.32, 400_000: 8.66},
    ("L", 12): {100_000: 13.79, 200_000: 9.67, 300_000: 8.64, 400_000: 8.21},
    ("L", 16): {100_000: 12.41, 200_000: 8.99, 300_000: 8.18, 400_000: 8.03},
    ("L", 20): {100_000: 12.04, 200_000: 8.94, 300_000: 8.03, 400_000: 7.98},
}
RATIO_IS_400K = {("B", 4): 74.26, ("B", 6): 83.85, ("B", 8): 85.94, ("B", 10): 81.12,
                 ("L", 10): 117.29, ("L", 12): 121.77, ("L", 16): 126.37, ("L", 20): 128.30}
# Table 4 (DDT-XL/2, 256 epochs, CFG, 250 steps): sharing ratio -> (speedup, uniform FID, DP FID)
SHARING = {0.0: (1.0, 1.31, None), 0.5: (1.6, 1.31, None), 0.66: (1.9, 1.32, None), 0.75: (2.3, 1.34, None),
           0.80: (2.6, 1.36, 1.33), 0.83: (2.7, 1.37, 1.36), 0.87: (3.0, 1.42, 1.40)}


def is_paper_setting(row) -> bool:
    """Whether a run is the paper's ablation setting (DDT-B/L at 256 px on ImageNet), so that its
    numbers are comparable with RATIO_FID."""
    return row.get("model.preset") in ("B", "L") and row.get("resolution.image_size") == 256 \
        and str(row.get("data.name", "")).startswith("imagenet")

# Table 2 (ImageNet 256, 400K steps, no CFG, FID-50K): (preset, row) -> (FID, IS). The original SiT and
# REPA rows come from other code bases; the suite trains the improved ones (conf/baseline).
TABLE2 = {
    ("B", "Improved-SiT"): (25.1, 58.8), ("B", "Improved-REPA"): (19.1, 76.5), ("B", "DDT"): (16.32, 86.0),
    ("B", "naive DDT"): (21.1, 73.0),
    ("L", "Improved-SiT"): (12.7, 95.7), ("L", "Improved-REPA"): (9.3, 116.6), ("L", "DDT"): (7.98, 128.1),
    ("XL", "Improved-SiT"): (10.9, 103.4), ("XL", "Improved-REPA"): (8.14, 124.9), ("XL", "DDT"): (6.62, 135.1),
}
TABLE2_SPLITS = {"B": 8, "L": 20, "XL": 22}  # the DDT row's split at each size
# System level (DDT-XL/2 22en6de, CFG 2.0 on t in (0.3, 1), 256 px): training step -> FID
SYSTEM_256 = {400_000: 1.52, 1_281_200: 1.31, 2_001_800: 1.26}


def table2_row(row) -> str | None:
    """Which row of Table 2 a run's recipe is (None: none of them); `row` holds flattened config keys."""
    repa = bool(row.get("repa.enabled"))
    if row.get("model.arch", "ddt") == "sit":
        return "Improved-REPA" if repa else "Improved-SiT"
    if not repa:
        return None  # DDT without REPA is not a row of the paper
    if row.get("model.norm", "rmsnorm") == "layernorm":
        return "naive DDT"
    return "DDT" if row.get("model.encoder_depth") == TABLE2_SPLITS.get(row.get("model.preset")) else None


def published(row) -> dict | None:
    """The paper's FID (and IS where published) for a run's recipe and step, with the figure or table it
    comes from; None when no published number matches (other data, size, step, sampler or guidance)."""
    if row.get("resolution.image_size") != 256 or not str(row.get("data.name", "")).startswith("imagenet"):
        return None
    preset, step, cfg = row.get("model.preset"), row.get("step"), row.get("sampler.cfg_scale")
    if row.get("sampler.num_steps") != 250 or step is None:
        return None
    if cfg == 1.0:
        split = row.get("model.encoder_depth")
        curve = RATIO_FID.get((preset, split)) if row.get("model.arch", "ddt") == "ddt" else None
        if curve and step in curve and row.get("repa.enabled") and table2_row(row) != "naive DDT":
            name = f"DDT-{preset}/2 {split}en{row.get('model.depth', 0) - split}de"
            return {"paper_fid": curve[step], "paper_isc": RATIO_IS_400K[(preset, split)] if step == 400_000
                    else None, "paper_row": f"{name}, Figures 7-8 at {step // 1000}K"}
        which = table2_row(row)
        if which and step == 400_000 and (preset, which) in TABLE2:
            fid, isc = TABLE2[(preset, which)]
            return {"paper_fid": fid, "paper_isc": isc, "paper_row": f"Table 2, {which}-{preset}/2"}
        return None
    interval = row.get("sampler.cfg_interval")
    if (cfg == 2.0 and preset == "XL" and table2_row(row) == "DDT" and step in SYSTEM_256
            and list(interval or []) == [0.3, 1.0]):
        return {"paper_fid": SYSTEM_256[step], "paper_isc": None,
                "paper_row": f"DDT-XL/2 22en6de with CFG 2.0, {step // 1000}K steps (system level)"}
    return None
