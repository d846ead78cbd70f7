"""Like with like: which runs of a folder form one study, and the one training step they are compared at.

    for label, runs in studies(df, axis=RATIO_AXIS): ...          # one study per recipe, data, size
    place = common_step(curves_of_one_study)                      # step + sample count every config has
    for heading, table in sampler_studies(df): ...                # one table per checkpoint and step

A study is every run that shares all of its config_id's settings (ddt.config.experiment) except the
studied axis; two studies are never pooled in a table, figure or test. Runs of one recipe that ran for
different numbers of steps are compared at a step all of them reached (their curves give it), with the
same number of samples behind each FID; a run that has no such point is left out, with a line naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from analysis.stats import _hashable, aggregate, format_stats
from ddt.config import SEED_KEY, how_it_ran
from ddt.schema import all_keys

RATIO_AXIS = ("model.encoder_depth", "model.decoder_depth")  # decoder_depth follows from encoder_depth
SAMPLER_PREFIX = "sampler."
SAMPLER_METRICS = ("fid", "isc_mean", "kid_mean", "sample.images_per_s", "sample.nfe_per_image")


def setting_keys(df: pd.DataFrame, axis: Sequence[str] = ()) -> list[str]:
    """The config columns that define an experiment (config_id's keys), without the studied `axis`."""
    known = all_keys()
    return [c for c in df if c in known and not how_it_ran(c) and c != SEED_KEY
            and not any(c == a or c.startswith(a) for a in axis)]


def studies(df: pd.DataFrame, axis: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    """The runs split into studies: equal settings except `axis`; each with a label of what sets it apart."""
    keys = setting_keys(df, axis)
    if df.empty:
        return []
    hashed = df[keys].map(_hashable) if keys else pd.DataFrame(index=df.index)
    groups = [part for _, part in hashed.groupby(keys, sort=False)] if keys else [hashed]
    differing = [k for k in keys if hashed[k].nunique() > 1]
    return [(", ".join(f"{k}={df.loc[part.index[0], k]}" for k in differing) or "all runs", df.loc[part.index])
            for part in groups]


@dataclass
class Place:
    """The training step (and sample count) a study is compared at, its rows there, and what was left out."""
    step: int | None
    num_samples: int | None
    rows: pd.DataFrame
    left_out: list[str] = field(default_factory=list)

    def heading(self) -> str:
        """`step 60, 500 samples per FID`: where the comparison was made."""
        samples = f", {int(self.num_samples)} samples per FID" if self.num_samples is not None else ""
        return f"step {self.step}{samples}"


def common_step(curves: pd.DataFrame, metric: str = "fid", by: str = "config_id") -> Place:
    """The latest (step, num_samples) at which the most settings (`by`) have `metric`; their rows there."""
    have = curves.dropna(subset=[metric]) if metric in curves else curves.iloc[0:0]
    if have.empty:
        return Place(None, None, have)
    samples = have["num_samples"].map(_hashable) if "num_samples" in have else pd.Series("<missing>", index=have.index)
    settings = have[by].map(_hashable) if by in have else pd.Series("-", index=have.index)
    places = pd.DataFrame({"step": have["step"], "n": samples, "setting": settings})
    counts = places.groupby(["step", "n"])["setting"].nunique().reset_index()
    step, n = counts.sort_values(["setting", "step"]).iloc[-1][["step", "n"]]
    at = (places["step"] == step) & (places["n"] == n)
    rows = have[at]
    missing = sorted(set(settings) - set(settings[at]))
    left_out = [f"left out (no {metric} at step {step} with the others' sample count): "
                + ", ".join(sorted(set(map(str, have.loc[settings == s, "run_dir" if "run_dir" in have else "run"]))))
                for s in missing]
    return Place(int(step), None if n == "<missing>" else int(n), rows, left_out)


def step_groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The rows split by (step, sample count behind their metrics), each with `step 60, 100 samples per FID`;
    rows of two groups are never in one table, since their numbers are not comparable."""
    if df.empty:
        return []
    step = df["step"] if "step" in df else pd.Series(None, index=df.index, dtype=object)
    count = df["num_samples"] if "num_samples" in df else pd.Series(None, index=df.index, dtype=object)
    keys = [(_int_or_none(s), _int_or_none(n)) for s, n in zip(step, count)]
    out = []
    for key in sorted(set(keys), key=lambda k: (k[0] is None, k[0] or 0, k[1] is None, k[1] or 0)):
        rows = df[[k == key for k in keys]]
        where = Place(*key, rows).heading() if key[0] is not None else "step not recorded"
        out.append((where + ("" if key[1] is not None else ", sample count not recorded"), rows))
    return out


def _int_or_none(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def sampler_studies(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """(heading, table, runs) per set of runs that sample the same weights (checkpoint file and step) with
    different sampler settings; the table has a column for every sampler setting that differs."""
    if df.empty:
        return []
    source = "sampled" if "sampled" in df and df["sampled"].notna().all() else "ckpt"
    weights = [c for c in (source, "step") if c in df]
    out = []
    for label, runs in studies(df, axis=(SAMPLER_PREFIX,)):
        for _, part in (runs.groupby(weights, sort=False, dropna=False) if weights else [(None, runs)]):
            varying = [c for c in part if c.startswith(SAMPLER_PREFIX) and part[c].map(_hashable).nunique() > 1]
            if not varying:
                continue
            where = ", ".join(f"{'weights' if c == source else c} {part[c].iloc[0]}" for c in weights)
            out.append((f"sampling ({where}{'; ' + label if label != 'all runs' else ''})",
                        sampler_table(part, varying), part))
    return out


def sampler_table(runs: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The sampler settings that differ (`columns`), the samples behind each FID and each setting's metrics,
    mean ± ci95 over seeds."""
    metrics = [m for m in SAMPLER_METRICS if m in runs and pd.to_numeric(runs[m], errors="coerce").notna().any()]
    agg = aggregate(runs, metrics=metrics)
    from analysis.plots import samples_column  # matplotlib only where a table is drawn

    shown = [*columns, *(c for c in ("sample.sharing_ratio",) if c in agg)]
    return pd.concat([agg[shown].rename(columns=lambda c: c.removeprefix(SAMPLER_PREFIX)), samples_column(agg),
                      format_stats(agg, metrics)], axis=1)
