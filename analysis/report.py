"""The notebooks' tables and figures without Jupyter, for a terminal or a CI log.

    python -m analysis.report runs/quickstart                  # figures into runs/quickstart/analysis/
    python -m analysis.report runs/quickstart --out docs/figures
    python -m analysis.report --wandb entity/ddt-ablations --group quickstart-20261125-212801 --out figs
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.results import load_runs, load_wandb


def report(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Print the tables and write every figure that the runs support; returns the figure paths."""
    figures = {}
    pd.set_option("display.width", 200)
    if df.empty:
        print("no completed runs")
        return figures
    print("== encoder/decoder ratio ==")
    print(plots.ratio_table(df).to_string(index=False))
    print(plots.best_split_table(df).to_string(index=False))
    if df["model.encoder_depth"].nunique() > 1:
        figures["encoder_ratio"] = plots.ratio_figure(df, out_dir)
        figures["fid_vs_step"] = plots.fid_vs_step_figure(df, out_dir)
    if "sampler.sharing" in df and df["sampler.sharing"].nunique() > 1:
        print("== sampling ==")
        print(plots.sharing_table(df).to_string(index=False))
        figures["sharing_speed"] = plots.sharing_figure(df, out_dir)
        for run_dir in df.loc[df["sampler.sharing"] == "dp"].get("run_dir", []):
            path = plots.dp_schedule_figure(run_dir, out_dir)
            if path:
                figures[f"dp_schedule:{Path(run_dir).name}"] = path
    for name, path in figures.items():
        print(f"figure {name}: {path}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="*", type=Path, help="sweep or run folders (results.json inside)")
    parser.add_argument("--wandb", help="entity/project to read instead of folders")
    parser.add_argument("--group", help="W&B group (the sweep)")
    parser.add_argument("--out", type=Path, help="figure folder (default: <first sweep>/analysis)")
    parser.add_argument("--query", help="pandas query selecting runs, e.g. \"`sampler.num_steps` == 16\"")
    args = parser.parse_args()
    if not args.sweep_dirs and not args.wandb:
        parser.error("give sweep folders or --wandb entity/project")
    df = load_wandb(args.wandb, group=args.group) if args.wandb else load_runs(*args.sweep_dirs)
    df = df.query(args.query) if args.query else df
    report(df, args.out or (args.sweep_dirs[0] / "analysis" if args.sweep_dirs else Path("analysis_out")))


if __name__ == "__main__":
    main()
