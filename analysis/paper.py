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
