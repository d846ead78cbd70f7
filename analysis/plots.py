"""The figures and tables of the notebooks (and of `python -m analysis.report`), from a runs DataFrame.

Each function takes the runs (load_runs / load_wandb) or curve points (load_curves), or their
analysis.stats.aggregate(), and shows the mean over seeds with its 95% interval. Each figure
function saves PNG and PDF into `out_dir` and returns the PNG path.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: notebooks display the saved figures, CI has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.paper import RATIO_FID, RATIO_IS_400K, is_paper_setting, published  # noqa: E402
from analysis.stats import ensure_aggregated, format_stat, format_stats  # noqa: E402
from ddt.tracking import METRICS  # noqa: E402


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


def ratio_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of an encoder/decoder ratio study: DDTs that trained (or were scored on their own
    checkpoints), not a sampler sweep over one given checkpoint (`ckpt` set, no train stage)."""
    df = _decoupled(df)
    if "ckpt" not in df or df.empty:
        return df
    stage = df["stage"] if "stage" in df else pd.Series([[]] * len(df), index=df.index)
    trained = stage.map(lambda todo: isinstance(todo, (list, tuple, str)) and "train" in todo)
    return df[df["ckpt"].isna() | trained]


def split_name(encoder_depth, depth) -> str:
    """`22en6de`: the encoder and decoder blocks of a split."""
    return f"{int(encoder_depth)}en{int(depth) - int(encoder_depth)}de"


def split_label(encoder_depth, context: dict) -> str:
    """split_name() of an encoder depth, given a context holding model.depth (as separation_lines passes)."""
    depth = context.get("model.depth")
    return split_name(encoder_depth, depth) if depth is not None else f"encoder_depth={encoder_depth}"


def _seeds(rows: pd.DataFrame) -> str:
    low, high = (int(rows["n"].min()), int(rows["n"].max())) if len(rows) else (0, 0)
    if high <= 1:
        return "1 seed"
    return f"mean ± 95% CI over {high if low == high else f'{low}-{high}'} seeds"


def ratio_figure(df: pd.DataFrame, out_dir: str | Path, stem: str = "encoder_ratio") -> Path:
    """FID and IS against the encoder depth at the last step, one line per model size, error bars =
    95% intervals over seeds (the paper's Figures 7-8); runs, or their aggregate(), as input."""
    agg = ensure_aggregated(ratio_rows(df), ("fid", "isc_mean"))
    fig, (ax_fid, ax_is) = plt.subplots(1, 2, figsize=(10, 4))
    for (preset, depth), rows in _sizes(agg):
        last = rows.sort_values("step").groupby("model.encoder_depth").tail(1).sort_values("model.encoder_depth")
        label = f"{preset} ({depth} blocks, step {int(last['step'].max())}, {_seeds(last)})"
        for ax, metric in ((ax_fid, "fid"), (ax_is, "isc_mean")):
            ax.errorbar(last["model.encoder_depth"], last[f"{metric}_mean"],
                        yerr=last[f"{metric}_ci95"].fillna(0), fmt="o-", capsize=3, label=label)
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
    return _save(fig, out_dir, stem)


def fid_vs_step_axes(ax, df: pd.DataFrame) -> None:
    """Draw mean FID against the training step per model size and split onto `ax`, with a band of
    mean ± 95% interval where a step has more than one seed (paper curves beside)."""
    agg = ensure_aggregated(ratio_rows(df), ("fid",))
    for (preset, depth), rows in _sizes(agg):
        for encoder_depth, split in rows.groupby("model.encoder_depth"):
            split = split.sort_values("step")
            mean, ci95 = split["fid_mean"].to_numpy(float), split["fid_ci95"].to_numpy(float)
            (line,) = ax.plot(split["step"], mean, "o-",
                              label=f"{preset} {split_name(encoder_depth, depth)} ({_seeds(split)})")
            if np.isfinite(ci95).any():
                ax.fill_between(split["step"].to_numpy(float), mean - ci95, mean + ci95, color=line.get_color(),
                                alpha=0.2, linewidth=0)
            if is_paper_setting(split.iloc[0].to_dict()) and (preset, encoder_depth) in RATIO_FID:
                curve = RATIO_FID[(preset, encoder_depth)]
                ax.plot(list(curve), list(curve.values()), "--", alpha=0.6, label=f"paper {encoder_depth}en")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID")
    if len(agg) and agg["fid_mean"].max() > 10 * agg["fid_mean"].min():
        ax.set_yscale("log")  # untrained models sit an order of magnitude above trained ones
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def fid_vs_step_figure(df: pd.DataFrame, out_dir: str | Path, curves: pd.DataFrame | None = None,
                       stem: str = "fid_vs_step") -> Path:
    """FID against the training step, one line (and 95% band over seeds) per split: from `curves`
    (load_curves, or its aggregate()) when given, else from the runs' final steps in `df`."""
    fig, ax = plt.subplots(figsize=(6, 4))
    fid_vs_step_axes(ax, curves if curves is not None and len(curves) else df)
    return _save(fig, out_dir, stem)


def best_split_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model size: the split with the lowest mean FID, with its IS and the number of splits tried."""
    agg = ensure_aggregated(df, ("fid", "isc_mean"))
    if "fid_mean" not in agg:
        return pd.DataFrame()
    rows = []
    for (preset, depth), runs in _sizes(agg.dropna(subset=["fid_mean"])):
        best = runs.loc[runs["fid_mean"].idxmin()]
        rows.append({"model": preset, "depth": depth, "splits tried": runs["model.encoder_depth"].nunique(),
                     "best split": split_name(best["model.encoder_depth"], depth),
                     "FID": format_stat(best["fid_mean"], best["fid_ci95"], best["fid_n"]),
                     "IS": format_stat(best["isc_mean_mean"], best["isc_mean_ci95"], best["isc_mean_n"]),
                     "step": best["step"], "samples": _count(best.get("num_samples"))})
    return pd.DataFrame(rows)


# The run's training time over all of its sessions (train.wall_time_s is the last session's alone).
RATIO_TABLE_METRICS = (*METRICS, "train.total_wall_time_s")


def _count(value) -> int | None:
    """A sample count as an int (None where not recorded)."""
    return None if value is None or pd.isna(value) else int(value)


def samples_column(agg: pd.DataFrame) -> pd.Series:
    """The number of samples behind each row's metrics (`samples`; None where not recorded)."""
    values = agg["num_samples"] if "num_samples" in agg else pd.Series(None, index=agg.index, dtype=object)
    return pd.Series([_count(v) for v in values], index=agg.index, dtype=object, name="samples")


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """FID / IS / KID / precision / recall by model size and encoder depth, with the step and sample count
    behind them: `mean ± ci95 (n=N)` for a setting with several seeds, the plain number for one."""
    agg = ensure_aggregated(df, RATIO_TABLE_METRICS)
    columns = [c for c in ("model.preset", "model.encoder_depth", "step") if c in agg]
    return pd.concat([agg[columns], samples_column(agg), format_stats(agg, RATIO_TABLE_METRICS)], axis=1)


def curve_table(curves: pd.DataFrame, metrics: Sequence[str] = ("fid", "isc_mean", "kid_mean")) -> pd.DataFrame:
    """The curve of every split, one row per step: `mean ± ci95 (n=N)` of each metric over seeds."""
    agg = ensure_aggregated(ratio_rows(curves), metrics)
    if agg.empty:
        return pd.DataFrame()
    split = [split_name(e, d) for e, d in zip(agg["model.encoder_depth"], agg["model.depth"])]
    table = pd.DataFrame({"model": agg["model.preset"], "split": split, "step": agg["step"]}, index=agg.index)
    return pd.concat([table, samples_column(agg), format_stats(agg, metrics)], axis=1)


# The columns of the paper's tables (Table 2, Table 5): the ADM evaluator's five metrics.
PAPER_METRICS = {"fid": "FID", "sfid": "sFID", "isc_mean": "IS", "precision": "Prec", "recall": "Rec"}


def _model_label(row: dict) -> str:
    """`B/2 8en4de` for a DDT, `B/2 SiT` for a single-stack baseline (the preset's patch is 2)."""
    preset, patch = row.get("model.preset"), row.get("model.patch_size", 2)
    if row.get("model.arch", "ddt") == "sit" or pd.isna(row.get("model.encoder_depth")):
        return f"{preset}/{patch} SiT" if row.get("model.arch") == "sit" else f"{preset}/{patch}"
    return f"{preset}/{patch} {split_name(row['model.encoder_depth'], row['model.depth'])}"


def paper_table(df: pd.DataFrame) -> pd.DataFrame:
    """The runs in the paper's layout (FID, sFID, IS, Prec, Rec; `mean ± ci95 (n=N)` over seeds), with the
    published FID / IS beside each row whose recipe, step, sampler and guidance match a paper row."""
    agg = ensure_aggregated(df, PAPER_METRICS)
    if "fid_mean" not in agg:
        return pd.DataFrame()
    table = pd.DataFrame({"model": [_model_label(row) for row in agg.to_dict("records")], "step": agg.get("step")},
                         index=agg.index)
    table = pd.concat([table, samples_column(agg), format_stats(agg, PAPER_METRICS).rename(columns=PAPER_METRICS)], axis=1)
    paper = [published(row) or {} for row in agg.to_dict("records")]
    for key, name in (("paper_fid", "paper FID"), ("paper_isc", "paper IS"), ("paper_row", "paper row")):
        table[name] = [p.get(key) for p in paper]
    return table


def sharing_figure(df: pd.DataFrame, out_dir: str | Path, stem: str = "sharing_speed") -> Path:
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
    return _save(fig, out_dir, stem)


SHARING_TABLE_METRICS = ("sample.images_per_s", "fid", "isc_mean")


def sharing_table(df: pd.DataFrame) -> pd.DataFrame:
    """FID and speed of every sampler setting (`mean ± ci95 (n=N)` over seeds where there are several)."""
    agg = ensure_aggregated(df, SHARING_TABLE_METRICS)
    columns = [c for c in ("sampler.sharing", "sampler.num_recompute", "sampler.num_steps", "sample.sharing_ratio")
               if c in agg]
    return pd.concat([agg[columns], format_stats(agg, SHARING_TABLE_METRICS)], axis=1)


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
