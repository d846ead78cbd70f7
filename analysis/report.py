"""The notebooks' tables and figures without Jupyter, for a terminal or a CI log, plus one HTML page.

    python -m analysis.report runs/quickstart                  # figures + report.html into runs/quickstart/analysis/
    python -m analysis.report runs/quickstart --out docs/figures
    python -m analysis.report --wandb entity/ddt-ablations --group quickstart-20261125-212801 --out figs

A setting run with several seeds shows `mean ± ci95 (n=N)` (95% Student-t interval over the seeds);
the report says which encoder/decoder splits differ beyond their intervals and which cannot be told
apart at this number of seeds. Only the tables the runs support are printed: the ratio tables need
two or more encoder depths among the trained runs of one recipe, a sampling table two or more sampler
settings over the same weights (checkpoint and step).

Like with like (analysis.compare): a folder holding several studies (recipes, data, model sizes) is
reported study by study, listed first; `--query` picks one. Every ratio comparison is made at one
training step that all of its settings reached, from their curves, with the same number of samples per
FID, and says which step; a run with no point there is left out with a line naming it. Two runs with the
same config_id, seed and weights count once (analysis.results says which).

    python -m analysis.report runs/quickstart --query "`train.max_steps` == 60"

Every table shows the step and the sample count behind its numbers; the tables of all runs (`runs`, the
paper layout) come one per (step, sample count). A promised figure (encoder_ratio.png, fid_vs_step.png)
the runs cannot give is named under `figures not drawn`, with why.

The report ends with each folder's status table (ddt.status: state, step, ETA, SLURM jobs, device-hours).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.html_page import Section, write_page
from analysis.compare import RATIO_AXIS, Place, common_step, sampler_studies, step_groups, studies
from analysis.results import curves_of, load_curves, load_runs, load_wandb, load_wandb_curves
from analysis.stats import aggregate, separated, separation_lines
from ddt.status import folder_problem

SEPARATION_METRICS = {"fid": "FID", "isc_mean": "IS"}
# One KID convention everywhere: torch-fidelity's value, unscaled (README, docs/analysis.md say the same).
UNITS = {"kid_mean": "kid_mean (torch-fidelity, unscaled)"}


def ratio_sections(place: Place, curves: pd.DataFrame) -> list[Section]:
    """Tables and statements of one encoder/decoder ratio study, every one at the study's common step."""
    at = f" at {place.heading()}" if place.step is not None else ""
    sections: list[Section] = [(f"encoder/decoder ratio{at}", plots.ratio_table(place.rows)),
                               (f"best split{at}", plots.best_split_table(place.rows))]
    agg = aggregate(place.rows)
    lines = list(place.left_out)
    for metric, name in SEPARATION_METRICS.items():
        if f"{metric}_mean" not in agg:
            continue
        try:
            pairs = separated(agg, by="model.encoder_depth", metric=metric)
        except ValueError as err:  # settings that no default context tells apart: say so, keep the report
            lines.append(f"{name}: not compared ({err})")
            continue
        lines += separation_lines(pairs, name, label=plots.split_label)
    sections.append((f"which splits differ beyond their 95% intervals{at}", lines))
    if len(curves) and curves["step"].nunique() > 1:
        sections.append(("FID vs training step (mean ± ci95 over seeds; one line per config_id)",
                         plots.curve_table(curves)))
    return sections


def study_sections(df: pd.DataFrame, curves: pd.DataFrame | None, out_dir: str | Path,
                   figures: dict[str, Path]) -> list[Section]:
    """The ratio and sampler studies among the runs, each reported on its own (figures added to `figures`)."""
    sections: list[Section] = []
    ratio = [(label, runs) for label, runs in studies(plots.ratio_rows(df), RATIO_AXIS)
             if "model.encoder_depth" in runs and runs["model.encoder_depth"].nunique() > 1]
    for i, (label, runs) in enumerate(ratio):
        suffix, about = (f"_{i + 1}", f" [{label}]") if len(ratio) > 1 else ("", "")
        study_curves = _study_curves(curves, runs)
        place = common_step(study_curves if len(study_curves) else runs)
        sections += [(heading + about, content) for heading, content in ratio_sections(place, study_curves)]
        figures[f"encoder_ratio{suffix}"] = plots.ratio_figure(place.rows, out_dir, stem=f"encoder_ratio{suffix}")
        figures[f"fid_vs_step{suffix}"] = plots.fid_vs_step_figure(runs, out_dir, curves=study_curves,
                                                                   stem=f"fid_vs_step{suffix}")
    sampling = sampler_studies(df)
    for i, (heading, table, runs) in enumerate(sampling):
        sections.append((heading, table))
        if "sampler.sharing" in runs and runs["sampler.sharing"].nunique() > 1:
            name = f"sharing_speed{f'_{i + 1}' if len(sampling) > 1 else ''}"
            figures[name] = plots.sharing_figure(runs, out_dir, stem=name)
            for run_dir in runs.loc[runs["sampler.sharing"] == "dp"].get("run_dir", []):
                path = plots.dp_schedule_figure(run_dir, out_dir)
                if path:
                    figures[f"dp_schedule:{Path(run_dir).name}"] = path
    if len(ratio) + len(sampling) > 1:
        listed = [f"encoder/decoder ratio: {label}" for label, _ in ratio] + [h for h, _, _ in sampling]
        sections.insert(0, ("studies in these folders, each reported on its own (select one with --query, e.g. "
                            "--query \"`train.lr` == 0.003\")", listed))
    return sections


def _study_curves(curves: pd.DataFrame | None, runs: pd.DataFrame) -> pd.DataFrame:
    """The curve points of a study's configs (config_id), also those of runs left out as duplicates."""
    if curves is None or curves.empty:
        return pd.DataFrame()
    if "config_id" in curves and "config_id" in runs and runs["config_id"].notna().all():
        return plots.ratio_rows(curves[curves["config_id"].isin(runs["config_id"])])
    return plots.ratio_rows(curves_of(curves, runs))


PAPER_HEADING = ("paper layout at {at} (ADM evaluator: FID, sFID, IS, precision, recall), published numbers "
                 "where a paper row matches")
# The figures the README promises in <sweep>/analysis/: each is drawn, or named with why it is not.
PROMISED_FIGURES = ("encoder_ratio", "fid_vs_step")


def grouped_sections(heading: str, df: pd.DataFrame, table) -> list[Section]:
    """`table(rows)` for the runs of each (step, sample count) on its own, `heading` formatted with `at`."""
    sections = []
    for at, rows in step_groups(df):
        content = table(rows)
        if len(content):
            sections.append((heading.format(at=at), content))
    return sections


def groups_note(df: pd.DataFrame) -> list[Section]:
    """A section naming the (step, sample count) groups of the runs when there are several (else none)."""
    groups = step_groups(df)
    if len(groups) < 2:
        return []
    lines = [f"{at}: {len(rows)} run(s): {', '.join(map(str, rows['run'])) if 'run' in rows else ''}".rstrip(": ")
             for at, rows in groups]
    return [(f"these runs are at {len(groups)} different (step, samples per FID): each group has tables of its own, "
             "never compared with another's (pick one with --query, e.g. \"`step` == 60 and `num_samples` == 100\")",
             lines)]


def undrawn_figures(df: pd.DataFrame, figures: dict[str, Path], where: str) -> list[str]:
    """One line per promised figure (PROMISED_FIGURES) the runs did not give, naming it and why."""
    missing = [name for name in PROMISED_FIGURES if not any(k == name or k.startswith(f"{name}_") for k in figures)]
    if not missing:
        return []
    trained = plots.ratio_rows(df) if len(df) else df
    depths = sorted({int(d) for d in trained.get("model.encoder_depth", pd.Series(dtype=float)).dropna()})
    if df.empty:
        why = f"no completed run in {where}"
    elif not depths:
        why = f"no run in {where} trained a DDT (only sampling runs of a given checkpoint)"
    elif len(depths) == 1:
        why = (f"only one encoder_depth ({depths[0]}) in {where}; a sweep such as "
               "`python launch.py -m model.encoder_depth=8,16,22` gives one")
    else:
        why = (f"the encoder depths in {where} ({', '.join(map(str, depths))}) belong to different studies, none "
               "with two of them (the studies are listed above)")
    about = {"fid_vs_step": " (drawn for each study of two or more encoder depths)"}
    return [f"{name}.png not drawn: {why}{about.get(name, '')}" for name in missing]


def status_sections(sweep_dirs: list[Path]) -> list[Section]:
    """Where each sweep stands (ddt.status's table: states, steps, ETA, SLURM jobs, device-hours)."""
    from ddt.status import sweep_status, table

    sections = []
    for d in sweep_dirs:
        status = sweep_status(d)
        study = status.pop("halving", None)  # a halving study: its rung table and device-hours, a section of their own
        if study is not None:
            sections.append((f"successive halving (python -m ddt.study show {d})", study["text"].splitlines()))
        sections.append((f"sweep status (python -m ddt.status {d})", table(status).splitlines()))
    return sections


def report(df: pd.DataFrame, out_dir: str | Path, curves: pd.DataFrame | None = None,
           sweep_dirs: list[Path] = ()) -> dict[str, Path]:
    """Print the tables, write every figure the runs support and report.html; returns the files' paths."""
    figures: dict[str, Path] = {}
    pd.set_option("display.width", 200)
    status = status_sections(list(sweep_dirs))
    where = ", ".join(map(str, sweep_dirs)) or "these runs"
    if df.empty:
        for heading, lines in status:
            print(f"== {heading} ==\n" + "\n".join(lines))
        print("no completed runs")
        print("\n".join(undrawn_figures(df, figures, where)))
        return figures
    sections = study_sections(df, curves, out_dir, figures)
    sections += groups_note(df)  # the tables below hold every run: one table per (step, sample count)
    if not any(heading.startswith(("encoder/decoder ratio", "sampling")) for heading, _ in sections):
        sections += grouped_sections("runs at {at}", df, plots.ratio_table)  # no study: the runs as they are
    sections += grouped_sections(PAPER_HEADING, df, plots.paper_table)
    undrawn = undrawn_figures(df, figures, where)
    if undrawn:
        sections.append(("figures not drawn", undrawn))
    sections = [(heading, content.rename(columns=UNITS) if isinstance(content, pd.DataFrame) else content)
                for heading, content in sections + status]
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
    for problem in filter(None, map(folder_problem, args.sweep_dirs)):  # one line, as ddt.status says it
        print(f"analysis.report: error: {problem}", file=sys.stderr)
        sys.exit(2)
    if args.wandb:
        df, curves = load_wandb(args.wandb, group=args.group), load_wandb_curves(args.wandb, group=args.group)
    else:
        df, curves = load_runs(*args.sweep_dirs), load_curves(*args.sweep_dirs, quiet=True)  # one line per duplicate
    if args.query:
        df = df.query(args.query)
        curves = curves_of(curves, df)
    report(df, args.out or (args.sweep_dirs[0] / "analysis" if args.sweep_dirs else Path("analysis_out")), curves,
           sweep_dirs=args.sweep_dirs)


if __name__ == "__main__":
    main()
