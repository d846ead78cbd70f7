"""Create (or update) a W&B report comparing the runs of one sweep group.

    python -m analysis.wandb_report --entity ME --project ddt-ablations --group quickstart-20261125-212801
    python -m analysis.wandb_report ... --dry-run      # print the report's panels, save nothing

The report holds a scatter plot of FID against `model.encoder_depth`, a parallel-coordinates panel
(encoder depth, REPA, sharing, steps -> FID, IS, KID), the training-loss curves, FID and KID against
the training step (`eval/step`) with the runs of one encoder depth drawn as their mean and a band
over the seeds, and the EMA sample grids of the group. Every column comes from what `logger=wandb` logs (flattened config and summary), so no
manual set-up is needed in the W&B UI. Needs network access and `wandb login`.
"""
from __future__ import annotations

import argparse


def curve_panel(wr, title: str, metric: str):
    """A line plot of `eval/<metric>` against the training step, the seeds of each encoder depth as
    one mean line with a standard-error band (W&B offers no 95% interval; analysis.report has it)."""
    # The logger writes the config flat ("model.encoder_depth" is one key), whose W&B backend key is
    # "model.encoder_depth.value"; wr.Config("model.encoder_depth") would address a nested config.
    return wr.LinePlot(title=title, x="eval/step", y=[f"eval/{metric}"], title_x="training step",
                       groupby=wr.Config("model.encoder_depth.value"), groupby_aggfunc="mean",
                       groupby_rangefunc="stderr")


def build_report(entity: str, project: str, group: str):
    """The wandb_workspaces Report object for one group (not yet saved)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runs = wr.Runset(entity=entity, project=project, name=group, filters=[expr.Metric("Group") == group])
    columns = ["c::model.preset", "c::model.encoder_depth", "c::repa.enabled", "c::sampler.sharing",
               "c::sampler.num_recompute", "s::step", "s::fid", "s::sfid", "s::isc_mean", "s::precision", "s::recall", "s::kid_mean"]
    panels = [
        wr.ScatterPlot(title="FID vs encoder depth", x=wr.Config("model.encoder_depth"), y=wr.SummaryMetric("fid")),
        wr.ScatterPlot(title="IS vs encoder depth", x=wr.Config("model.encoder_depth"),
                       y=wr.SummaryMetric("isc_mean")),
        wr.ParallelCoordinatesPlot(title="settings -> metrics",
                                   columns=[wr.ParallelCoordinatesPlotColumn(metric=c) for c in columns]),
        wr.LinePlot(title="training loss", x="Step", y=["train/loss"]),
        curve_panel(wr, "FID vs training step", "fid"),
        curve_panel(wr, "sFID vs training step", "sfid"),
        curve_panel(wr, "KID vs training step", "kid_mean"),
        wr.MediaBrowser(title="EMA samples", media_keys=["samples/ema_grid"]),
    ]
    return wr.Report(project=project, entity=entity, title=f"DDT ablation: {group}",
                     description="Encoder/decoder ratio, REPA and sampler settings of one sweep (ddt suite).",
                     blocks=[wr.H1(text=f"Sweep {group}"), wr.PanelGrid(runsets=[runs], panels=panels)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", default="ddt-ablations")
    parser.add_argument("--group", required=True, help="the sweep's W&B group (runs/<name>/wandb_group.txt)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    report = build_report(args.entity, args.project, args.group)
    if args.dry_run:
        for panel in report.blocks[1].panels:
            print(type(panel).__name__, panel.title)
        return
    report.save()
    print(report.url)


if __name__ == "__main__":
    main()
