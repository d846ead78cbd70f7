"""The notebooks' tables and figures without Jupyter, for a terminal or a CI log, plus one HTML page.

    python -m analysis.report runs/quickstart                  # figures + report.html into runs/quickstart/analysis/
    python -m analysis.report runs/quickstart --out docs/figures
    python -m analysis.report --wandb entity/ddt-ablations --group quickstart-20261125-212801 --out figs

A setting run with several seeds shows `mean ± ci95 (n=N)` (95% Student-t interval over the seeds);
the report says which encoder/decoder splits differ beyond their intervals and which cannot be told
apart at this number of seeds. Only the tables the runs support are printed: the ratio tables need
two or more encoder depths among the trained runs, the sampling table two or more sharing modes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.html_page import Section, write_page
from analysis.results import curves_of, load_curves, load_runs, load_wandb, load_wandb_curves
from analysis.stats import aggregate, separated, separation_lines

SEPARATION_METRICS = {"fid": "FID", "isc_mean": "IS"}


def ratio_sections(runs: pd.DataFrame, curves: pd.DataFrame) -> list[Section]:
    """Tables and statements of an encoder/decoder ratio study (the runs of ratio_rows)."""
    sections: list[Section] = [("encoder/decoder ratio", plots.ratio_table(runs)),
                               ("best split", plots.best_split_table(runs))]
    agg = aggregate(runs)
    lines = []
    for metric, name in SEPARATION_METRICS.items():
        if f"{metric}_mean" not in agg:
            continue
        try:
            pairs = separated(agg, by="model.encoder_depth", metric=metric)
        except ValueError as err:  # settings that no default context tells apart: say so, keep the report
            lines.append(f"{name}: not compared ({err})")
            continue
        lines += separation_lines(pairs, name, label=plots.split_label)
    sections.append(("which splits differ beyond their 95% intervals (final step)", lines))
    if len(curves) and curves["step"].nunique() > 1:
        sections.append(("FID vs training step (mean ± ci95 over seeds)", plots.curve_table(curves)))
    return sections


def report(df: pd.DataFrame, out_dir: str | Path, curves: pd.DataFrame | None = None) -> dict[str, Path]:
    """Print the tables, write every figure the runs support and report.html; returns the files' paths."""
    figures: dict[str, Path] = {}
    pd.set_option("display.width", 200)
    if df.empty:
        print("no completed runs")
        return figures
    sections: list[Section] = []
    ratio = plots.ratio_rows(df)
    ratio_curves = plots.ratio_rows(curves) if curves is not None and len(curves) else pd.DataFrame()
    if "model.encoder_depth" in ratio and ratio["model.encoder_depth"].nunique() > 1:
        sections += ratio_sections(ratio, ratio_curves)
        figures["encoder_ratio"] = plots.ratio_figure(ratio, out_dir)
        figures["fid_vs_step"] = plots.fid_vs_step_figure(ratio, out_dir, curves=ratio_curves)
    if "sampler.sharing" in df and df["sampler.sharing"].nunique() > 1:
        sections.append(("sampling", plots.sharing_table(df)))
        figures["sharing_speed"] = plots.sharing_figure(df, out_dir)
        for run_dir in df.loc[df["sampler.sharing"] == "dp"].get("run_dir", []):
            path = plots.dp_schedule_figure(run_dir, out_dir)
            if path:
                figures[f"dp_schedule:{Path(run_dir).name}"] = path
    if not sections:  # one setting, or nothing that varies along a studied axis: the runs as they are
        sections.append(("runs", plots.ratio_table(df)))
    for heading, content in sections:
        print(f"== {heading} ==")
        print(content.to_string(index=False) if isinstance(content, pd.DataFrame) else "\n".join(content))
    for name, path in figures.items():
        print(f"figure {name}: {path}")
    page = write_page(Path(out_dir) / "report.html", f"DDT sweep report: {', '.join(_groups(df))}", sections,
                      figures)
    print(f"report: {page}")
    return {**figures, "report.html": page}


def _groups(df: pd.DataFrame) -> list[str]:
    return [str(g) for g in df["group"].dropna().unique()] if "group" in df else []


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
    if args.wandb:
        df, curves = load_wandb(args.wandb, group=args.group), load_wandb_curves(args.wandb, group=args.group)
    else:
        df, curves = load_runs(*args.sweep_dirs), load_curves(*args.sweep_dirs)
    if args.query:
        df = df.query(args.query)
        curves = curves_of(curves, df)
    report(df, args.out or (args.sweep_dirs[0] / "analysis" if args.sweep_dirs else Path("analysis_out")), curves)


if __name__ == "__main__":
    main()
