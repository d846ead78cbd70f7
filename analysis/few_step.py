"""The few-step study (experiments/few_step.yaml): FID against NFE, one line per solver and time shift.

    from analysis.few_step import load_few_step, few_step_figure, few_step_table, recommendations
    df = load_few_step("runs/few_step")

NFE per image is results.json's sample.nfe_per_image (network evaluations; a guided evaluation counts
once); results written before it existed fall back to N (Euler, Adams) or 2N − 1 (Heun). A W&B
frame (analysis.results.load_wandb) works too: `few_step_frame(load_wandb(...))`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: notebooks display the saved figures, CI has no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.plots import _save  # noqa: E402
from analysis.results import load_runs  # noqa: E402
from analysis.stats import intervals_apart, aggregate, format_stat  # noqa: E402

SOLVER_ORDER = ("euler", "adams 2", "adams 3", "adams 4", "heun")
SOLVER_RANK = {s: i for i, s in enumerate(SOLVER_ORDER)}


def solver_label(solver: str, order: float | None) -> str:
    """`euler`, `adams K` or `heun`; Adams order 1 is Euler to the last bit, so it is labelled euler."""
    if solver == "adams":
        order = 2 if order is None or pd.isna(order) else int(order)
        return "euler" if order == 1 else f"adams {order}"
    return solver


def few_step_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """A load_runs / load_wandb frame with `solver` (label), `num_steps`, `timeshift` and `nfe` columns."""
    df = runs.copy()
    orders = df["sampler.order"] if "sampler.order" in df else pd.Series(None, index=df.index)
    df["solver"] = [solver_label(s, o) for s, o in zip(df["sampler.solver"], orders)]
    df["num_steps"], df["timeshift"] = df["sampler.num_steps"].astype(int), df["sampler.timeshift"].astype(float)
    fallback = (2 * df["num_steps"] - 1).where(df["sampler.solver"] == "heun", df["num_steps"])
    recorded = df["sample.nfe_per_image"] if "sample.nfe_per_image" in df else pd.Series(float("nan"), index=df.index)
    df["nfe"] = recorded.fillna(fallback).astype(float)
    return few_step_frame_order(df)


def load_few_step(*sweep_dirs: str | Path) -> pd.DataFrame:
    """The completed runs of few-step sweeps (analysis.results.load_runs) as a few_step_frame."""
    runs = load_runs(*sweep_dirs)
    return runs if runs.empty else few_step_frame(runs)


def few_step_figure(df: pd.DataFrame, out_dir: str | Path, paper: dict | None = None,
                    name: str = "few_step") -> Path:
    """FID against NFE: colour = solver, line style = time shift (log-scale FID)."""
    colours = dict(zip(SOLVER_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = {1.0: "-", 2.0: "--", 3.0: ":"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (solver, shift), runs in df.groupby(["solver", "timeshift"], sort=False):
        runs = runs.groupby("nfe", as_index=False)["fid"].mean()  # seeds, where there are several
        ax.plot(runs["nfe"], runs["fid"], styles.get(shift, "-."), marker="o", ms=3, color=colours.get(solver),
                label=f"{solver}, shift {shift:g}")
    if paper:  # the official figure's numbers (DDT-XL/2, its own scale): steps = NFE of one evaluation per step
        for shift, by_steps in paper.items():
            steps = sorted(int(k) for k in by_steps)
            ax.plot(steps, [by_steps[s] if s in by_steps else by_steps[str(s)] for s in steps], color="grey",
                    alpha=0.5, lw=1, label=f"official XL/2, shift {shift}")
    ax.set_xlabel("NFE per image (network evaluations; a guided one counts once)")
    ax.set_ylabel("FID")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir, name)


def few_step_table(df: pd.DataFrame, metric: str = "fid") -> pd.DataFrame:
    """`metric` by (solver, shift) rows and NFE columns (mean over seeds where there are several)."""
    table = df.pivot_table(index=["solver", "timeshift"], columns="nfe", values=metric, aggfunc="mean")
    return table.sort_index(key=lambda c: c.map(SOLVER_RANK) if c.name == "solver" else c)


def few_step_markdown(df: pd.DataFrame, metric: str = "fid", digits: int = 1) -> str:
    """A markdown table of `metric`: rows solver × shift, columns NFE, cells mean ± ci95 (n) over seeds."""
    agg = aggregate(df, metrics=[metric])
    agg["cell"] = [format_stat(r[f"{metric}_mean"], r[f"{metric}_ci95"], r[f"{metric}_n"], digits, text=True)
                   .replace(" (n=1)", "") for r in agg.to_dict("records")]
    nfes = sorted(agg["nfe"].unique())
    lines = ["| solver | shift | " + " | ".join(f"NFE {n:g}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for (solver, shift), rows in few_step_frame_order(agg).groupby(["solver", "timeshift"], sort=False):
        cells = dict(zip(rows["nfe"], rows["cell"]))
        lines.append(f"| {solver} | {shift:g} | " + " | ".join(cells.get(n, "") for n in nfes) + " |")
    return "\n".join(lines)


def few_step_frame_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the figure's order: solver (Euler, Adams 2-4, Heun), then shift, then NFE."""
    return df.sort_values(["solver", "timeshift", "nfe"], key=lambda c: c.map(SOLVER_RANK) if c.name == "solver" else c,
                          ignore_index=True)


def recommendations(df: pd.DataFrame, budgets: Sequence[int] = (5, 8, 12)) -> pd.DataFrame:
    """Per NFE budget, the setting with the lowest mean FID at exactly that NFE, the runner-up, and whether
    their 95% intervals over seeds are apart (False with one seed: then the ranking is not a finding)."""
    agg = aggregate(df, metrics=["fid"])
    rows = []
    for budget in budgets:
        within = agg[agg["nfe"] == budget].sort_values("fid_mean", ignore_index=True)
        if within.empty:
            continue
        best = within.iloc[0]
        second = within.iloc[1] if len(within) > 1 else None
        rows.append({"budget_nfe": budget, "solver": best["solver"], "timeshift": best["timeshift"],
                     "num_steps": int(best["num_steps"]), "fid": format_stat(best["fid_mean"], best["fid_ci95"],
                                                                             best["fid_n"], 1, text=True),
                     "runner_up": None if second is None else f"{second['solver']}, shift {second['timeshift']:g}: "
                     + format_stat(second["fid_mean"], second["fid_ci95"], second["fid_n"], 1, text=True),
                     "apart": second is not None and intervals_apart(best["fid_mean"], best["fid_ci95"],
                                                                      second["fid_mean"], second["fid_ci95"])})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m analysis.few_step SWEEP_DIR... --out DIR`: FID and KID tables, the choice per budget, the figure."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dirs", nargs="+")
    parser.add_argument("--out", default=None, help="folder for few_step.png/.pdf (default: SWEEP_DIR/analysis)")
    parser.add_argument("--paper", action="store_true", help="draw the official XL/2 figure's numbers too")
    args = parser.parse_args(argv)
    df = load_few_step(*args.sweep_dirs)
    if df.empty:
        raise SystemExit(f"no completed runs under {args.sweep_dirs}")
    print(f"{len(df)} runs\n\nFID\n{few_step_markdown(df, 'fid')}\n\nKID\n{few_step_markdown(df, 'kid_mean', 0)}\n")
    print(recommendations(df).to_string(index=False))
    paper = df["paper"].dropna().iloc[0] if args.paper and "paper" in df else None
    print(few_step_figure(df, args.out or Path(args.sweep_dirs[0]) / "analysis", paper=paper))


if __name__ == "__main__":
    main()
