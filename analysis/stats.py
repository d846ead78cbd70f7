"""Mean, spread and 95% interval of the metrics over seeds, and which settings differ beyond them.

    agg = aggregate(load_runs("runs/ratio"))      # one row per setting (at its final step), over seeds
    agg = aggregate(load_curves("runs/ratio"))    # one row per setting and curve step
    separated(agg, by="model.encoder_depth", metric="fid")

Rows are one group when they differ only in `over` (the seed): the runner's `config_id` says so
when every row has one; runs from before config_id existed are grouped by their config columns.
The interval is Student's t at 95% (t.ppf(0.975, n - 1) * std / sqrt(n)); with one seed there is
no interval (NaN), so nothing is ever called different on a single measurement.
"""
from __future__ import annotations

import json
import math
from itertools import combinations
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from ddt.tracking import METRICS

# Columns naming one run, or results that vary from seed to seed: never part of a setting.
RUN_COLUMNS = ("run", "run_dir", "wandb_id", "group", "status", "config_id")
RESULT_COLUMNS = ("final", "num_samples", "isc_std", "kid_std", "f_score")
RESULT_SUFFIXES = ("wall_time_s", "images_per_s", "final_loss")  # timing, throughput, training loss
RESULT_PREFIXES = ("curve_cost.",)
# kept in the aggregate when the whole group shares them (num_samples: the images behind the metrics)
CARRIED_RUN_COLUMNS = ("group", "config_id", "num_samples")
STATS = ("mean", "std", "ci95", "n")
SORT_COLUMNS = ("model.preset", "model.encoder_depth", "sampler.sharing", "sampler.num_recompute")
PAIR_COLUMNS = ("a", "b", "mean_a", "ci95_a", "n_a", "mean_b", "ci95_b", "n_b", "differ", "verdict")
DIFFER, UNDECIDED = "differ", "not distinguishable at this n"


def sort_by_setting(frame: pd.DataFrame, then: Sequence[str] = ()) -> pd.DataFrame:
    """Rows ordered by model size, encoder depth and sampler settings (stable), then by `then`."""
    sort = [c for c in (*SORT_COLUMNS, *then) if c in frame]
    return frame.sort_values(sort, kind="stable").reset_index(drop=True) if sort and len(frame) else frame


def describes_a_run(column: str) -> bool:
    """Whether a column names one run or holds a result (metric, timing), rather than a setting."""
    return (column in RUN_COLUMNS or column in RESULT_COLUMNS or column in METRICS
            or column.endswith(RESULT_SUFFIXES) or column.startswith(RESULT_PREFIXES))


def aggregate(df: pd.DataFrame, over: str = "seed", metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per group of rows differing only in `over` (and per step): n, seeds, <m>_mean/_std/_ci95/_n."""
    metrics = _metrics(df, metrics)
    carried = [c for c in df if c != over and c not in metrics
               and (c in CARRIED_RUN_COLUMNS or not describes_a_run(c))]
    if "config_id" in df and df["config_id"].notna().all():
        keys = ["config_id", *(["step"] if "step" in df else [])]
    else:
        keys = [c for c in carried if c not in CARRIED_RUN_COLUMNS]
    rows = []
    for positions in _groups(df, keys):
        part = df.iloc[positions]
        row = {c: _shared_value(part[c]) for c in carried}
        row["n"] = len(part)
        row["seeds"] = sorted(part[over].dropna().tolist()) if over in part else []
        for metric in metrics:
            row.update(_summary(part[metric], metric))
        rows.append(row)
    return sort_by_setting(pd.DataFrame(rows), then=("step",))


def ensure_aggregated(df: pd.DataFrame, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """`df` if it is already an aggregate, else aggregate(df) over the seeds for the metrics it has."""
    if {"n", "seeds"} <= set(df.columns) or df.empty:
        return df
    present = None if metrics is None else [m for m in metrics if m in df and df[m].notna().any()]
    return aggregate(df, metrics=present)


def metrics_of(agg: pd.DataFrame) -> list[str]:
    """The metrics an aggregate holds statistics of."""
    return [c[:-len("_ci95")] for c in agg if c.endswith("_ci95") and f"{c[:-len('_ci95')]}_mean" in agg]


def setting_columns(agg: pd.DataFrame) -> list[str]:
    """The columns of an aggregate that describe its settings (not n, seeds, statistics or run names)."""
    stats = {f"{m}_{s}" for m in metrics_of(agg) for s in STATS}
    return [c for c in agg if c not in stats and c not in ("n", "seeds") and c not in CARRIED_RUN_COLUMNS]


def separated(agg: pd.DataFrame, by: str, metric: str = "fid", within: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per pair of `by` values in each comparable context: do their 95% intervals not overlap?"""
    mean, ci, count = f"{metric}_mean", f"{metric}_ci95", f"{metric}_n"
    if mean not in agg:
        raise KeyError(f"{mean} is not a column: pass aggregate(df) with {metric}")
    within = list(within) if within is not None else comparable_within(agg, by)
    rows = []
    for positions in _groups(agg, within):
        part = agg.iloc[positions].sort_values(by, kind="stable")
        if part[by].map(_hashable).duplicated().any():
            raise ValueError(f"several groups share one {by} value within {within or 'the frame'}; "
                             f"pass within=[...] naming the columns that tell them apart")
        context = {c: part[c].iloc[0] for c in within}
        for (_, a), (_, b) in combinations(part.iterrows(), 2):
            differ = intervals_apart(a[mean], a[ci], b[mean], b[ci])
            rows.append({**context, "a": a[by], "b": b[by], "mean_a": a[mean], "ci95_a": a[ci], "n_a": a[count],
                         "mean_b": b[mean], "ci95_b": b[ci], "n_b": b[count], "differ": differ,
                         "verdict": DIFFER if differ else UNDECIDED})
    return pd.DataFrame(rows, columns=[*within, *PAIR_COLUMNS])


def comparable_within(agg: pd.DataFrame, by: str) -> list[str]:
    """The columns two groups must share to be compared on `by`: model size, step and every other
    setting that varies, except those that follow from `by` (e.g. model.decoder_depth)."""
    base = [c for c in ("model.preset", "model.depth", "step") if c in agg and c != by]
    hashed = agg.map(_hashable)
    others = [c for c in setting_columns(agg) if c not in base and c != by]
    follows = hashed.groupby([*base, by], sort=False)[others].nunique().le(1).all() if others else {}
    return base + [c for c in others if not follows[c]]


def separation_lines(pairs: pd.DataFrame, metric: str,
                     label: Callable[[Any, dict], str] | None = None) -> list[str]:
    """The pairs of separated() in words: which differ beyond their 95% intervals, which cannot be told apart."""
    if pairs.empty:
        return [f"{metric}: no pairs to compare"]
    label = label or (lambda value, context: str(value))
    context_columns = [c for c in pairs if c not in PAIR_COLUMNS]
    differ = int(pairs["differ"].sum())
    lines = [f"{metric}: {differ} of {len(pairs)} pairs differ beyond their 95% intervals, "
             f"{len(pairs) - differ} not distinguishable at this n"]
    single: dict[str, list[str]] = {}  # context -> its one-seed settings, in order of appearance
    for row in pairs.to_dict("records"):
        context = {c: row[c] for c in context_columns}
        where = ", ".join(f"{c}={v}" for c, v in context.items())
        a, b = label(row["a"], context), label(row["b"], context)
        if min(row["n_a"], row["n_b"]) < 2:  # listed once below rather than pair by pair
            names = single.setdefault(where, [])
            names += [name for name, n in ((a, row["n_a"]), (b, row["n_b"])) if n < 2 and name not in names]
            continue
        text = (f"  [{where}] {a} {format_stat(row['mean_a'], row['ci95_a'], row['n_a'], text=True)} vs "
                f"{b} {format_stat(row['mean_b'], row['ci95_b'], row['n_b'], text=True)}: ")
        if row["differ"]:
            lower = a if row["mean_a"] < row["mean_b"] else b
            text += f"differ (95% intervals do not overlap; {lower} is lower)"
        else:
            text += f"{UNDECIDED} (95% intervals overlap)"
        lines.append(text)
    for where, names in single.items():
        lines.append(f"  [{where}] one seed, so no interval: every pair with {', '.join(names)} is {UNDECIDED}")
    return lines


def format_stat(mean: float, ci95: float, n: int, digits: int = 2, text: bool = False) -> str | float:
    """`mean ± ci95 (n=N)` when there is an interval; otherwise the plain mean (a number unless `text`)."""
    if mean is None or not np.isfinite(mean):
        return "" if text else np.nan
    if n and n > 1 and ci95 is not None and np.isfinite(ci95):
        return f"{mean:.{digits}f} ± {ci95:.{digits}f} (n={int(n)})"
    return f"{mean:.{digits}f} (n=1)" if text else round(float(mean), digits)


def format_stats(agg: pd.DataFrame, metrics: Iterable[str], digits: int = 3) -> pd.DataFrame:
    """One column per metric of an aggregate, each cell format_stat(mean, ci95, n)."""
    return pd.DataFrame({m: [format_stat(r[f"{m}_mean"], r[f"{m}_ci95"], r[f"{m}_n"], digits)
                             for r in agg.to_dict("records")] for m in metrics if f"{m}_mean" in agg},
                        index=agg.index)


def _metrics(df: pd.DataFrame, metrics: Iterable[str] | None) -> list[str]:
    if metrics is None:
        return [m for m in METRICS if m in df and pd.to_numeric(df[m], errors="coerce").notna().any()]
    metrics = list(metrics)
    missing = [m for m in metrics if m not in df]
    if missing:
        raise KeyError(f"no column {missing} to aggregate")
    return metrics


def _summary(values: pd.Series, metric: str) -> dict[str, float]:
    x = pd.to_numeric(values, errors="coerce").dropna().to_numpy(float)
    n = len(x)
    std = x.std(ddof=1) if n > 1 else math.nan
    ci95 = scipy_stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {f"{metric}_mean": x.mean() if n else math.nan, f"{metric}_std": std, f"{metric}_ci95": ci95,
            f"{metric}_n": n}


def intervals_apart(mean_a: float, ci_a: float, mean_b: float, ci_b: float) -> bool:
    """Whether two 95% intervals do not overlap (never, where either is missing: one seed)."""
    if not all(np.isfinite([mean_a, ci_a, mean_b, ci_b])):
        return False  # no interval (one seed): nothing can be claimed
    return bool(mean_a + ci_a < mean_b - ci_b or mean_b + ci_b < mean_a - ci_a)


def _hashable(value: Any) -> Any:
    """A value groupby can use: lists and dicts (e.g. `stage`) as JSON, every kind of missing as one."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return "<missing>" if pd.isna(value) else value


def _groups(df: pd.DataFrame, keys: list[str]) -> list[np.ndarray]:
    """Row positions of each group of equal `keys`, in order of first appearance."""
    if not keys or df.empty:
        return [np.arange(len(df))] if len(df) else []
    indices = df[keys].map(_hashable).groupby(keys, sort=False).indices
    return sorted(indices.values(), key=lambda positions: positions[0])


def _shared_value(values: pd.Series) -> Any:
    """The group's value of a column when every row has the same one, else None."""
    return values.iloc[0] if values.map(_hashable).nunique() == 1 else None
