"""The figures and tables of the notebooks (and of `python -m analysis.report`), from a runs DataFrame.

Each figure function saves PNG and PDF into `out_dir` and returns the PNG path.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: notebooks display the saved figures, CI has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.paper import RATIO_FID, RATIO_IS_400K, is_paper_setting  # noqa: E402


def _save(fig, out_dir: str | Path, name: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"{name}.{ext}", dpi=150)
    plt.close(fig)
    return out_dir / f"{name}.png"


def _sizes(df: pd.DataFrame):
    return df.groupby(["model.preset", "model.depth"], sort=False) if len(df) else []


def _decoupled(df: pd.DataFrame) -> pd.DataFrame:
    """DDT runs only (runs from before model.arch existed are DDTs)."""
    return df[df["model.arch"].fillna("ddt") == "ddt"] if "model.arch" in df else df


def ratio_figure(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """FID and IS against the encoder depth, one line per model size (the paper's Figures 7-8)."""
    fig, (ax_fid, ax_is) = plt.subplots(1, 2, figsize=(10, 4))
    for (preset, depth), runs in _sizes(_decoupled(df)):
        last = runs.sort_values("step").groupby("model.encoder_depth").tail(1).sort_values("model.encoder_depth")
        label = f"{preset} ({depth} blocks, step {int(last['step'].max())})"
        ax_fid.plot(last["model.encoder_depth"], last["fid"], "o-", label=label)
        ax_is.plot(last["model.encoder_depth"], last["isc_mean"], "o-", label=label)
        if any(is_paper_setting(r) for r in last.to_dict("records")):
            splits = sorted(k[1] for k in RATIO_FID if k[0] == preset)
            ax_fid.plot(splits, [RATIO_FID[(preset, e)][400_000] for e in splits], "k--", alpha=0.6,
                        label=f"paper DDT-{preset}/2, 400K")
            ax_is.plot(splits, [RATIO_IS_400K[(preset, e)] for e in splits], "k--", alpha=0.6,
                       label=f"paper DDT-{preset}/2, 400K")
    for ax, name in ((ax_fid, "FID (lower is better)"), (ax_is, "IS (higher is better)")):
        ax.set_xlabel("encoder depth (blocks of the condition encoder)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_dir, "encoder_ratio")


def fid_vs_step_figure(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """FID against the training step, one line per encoder/decoder split (paper curves beside)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (preset, depth), runs in _sizes(_decoupled(df)):
        for encoder_depth, split in runs.groupby("model.encoder_depth"):
            split = split.sort_values("step")
            ax.plot(split["step"], split["fid"], "o-", label=f"{preset} {encoder_depth}en{depth - encoder_depth}de")
            if is_paper_setting(split.iloc[0].to_dict()) and (preset, encoder_depth) in RATIO_FID:
                curve = RATIO_FID[(preset, encoder_depth)]
                ax.plot(list(curve), list(curve.values()), "--", alpha=0.6, label=f"paper {encoder_depth}en")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID")
    if len(df) and df["fid"].max() > 10 * df["fid"].min():
        ax.set_yscale("log")  # untrained models sit an order of magnitude above trained ones
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "fid_vs_step")


def best_split_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model size: the split with the lowest FID, with its IS and the number of splits tried."""
    rows = []
    for (preset, depth), runs in _sizes(df):
        best = runs.loc[runs["fid"].idxmin()]
        rows.append({"model": preset, "depth": depth, "splits tried": runs["model.encoder_depth"].nunique(),
                     "best split": f"{int(best['model.encoder_depth'])}en{int(depth - best['model.encoder_depth'])}de",
                     "FID": round(best["fid"], 2), "IS": round(best["isc_mean"], 2), "step": best["step"]})
    return pd.DataFrame(rows)


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """FID / IS / precision / recall of every run, by model size and encoder depth."""
    columns = ["model.preset", "model.encoder_depth", "step", "fid", "isc_mean", "precision", "recall",
               "train.wall_time_s"]
    return df[[c for c in columns if c in df]].round(3)


def sharing_figure(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """FID against sampling speed (images/s) for encoder sharing none / uniform / dp."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for sharing, runs in df.groupby("sampler.sharing"):
        runs = runs.sort_values("sample.images_per_s")
        ax.plot(runs["sample.images_per_s"], runs["fid"], "o-" if sharing != "none" else "s", label=sharing)
        for _, r in runs.iterrows():
            fresh = " fresh t" if r.get("sampler.fresh_timestep") is True else ""
            if sharing != "none":
                ax.annotate(f"K={int(r['sample.num_recompute'])}{fresh}", (r["sample.images_per_s"], r["fid"]),
                            fontsize=7)
    ax.set_xlabel("sampling speed (images / s)")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    ax.legend(title="sampler.sharing")
    return _save(fig, out_dir, "sharing_speed")


def sharing_table(df: pd.DataFrame) -> pd.DataFrame:
    """FID and speed of every sampler setting."""
    columns = ["sampler.sharing", "sampler.num_recompute", "sampler.num_steps", "sample.sharing_ratio",
               "sample.images_per_s", "fid", "isc_mean"]
    return df[[c for c in columns if c in df]].round(3)


def dp_schedule_figure(run_dir: str | Path, out_dir: str | Path) -> Path | None:
    """The dp schedule of a run drawn over its step-similarity matrix (None if the run has none)."""
    path = Path(run_dir) / "sharing_schedule.json"
    if not path.exists():
        return None
    schedule = json.loads(path.read_text())
    similarity, steps = np.array(schedule["similarity"]), schedule["recompute_steps"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(similarity, cmap="viridis", origin="upper")
    fig.colorbar(image, ax=ax, label="mean cosine similarity of encoder outputs")
    bounds = [*steps, len(similarity)]
    for start, stop in zip(bounds[:-1], bounds[1:]):  # each recompute step serves [start, stop)
        ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), stop - start, stop - start, fill=False,
                                   edgecolor="red", linewidth=1))
    ax.set_title(f"dp schedule: K={len(steps)} of {len(similarity)} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("step")
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return _save(fig, out_dir, f"dp_schedule_K{len(steps)}_{digest}")
