"""Every run of one or more sweeps as one pandas DataFrame, from run folders or from W&B.

    from analysis.results import load_runs, load_wandb
    df = load_runs("runs/quickstart")                                  # results.json of each run
    df = load_wandb("entity/ddt-ablations", group="quickstart-20261125-212801")   # wandb.Api()

Both give the same columns: the resolved config flattened to dotted keys (`model.encoder_depth`,
`sampler.sharing`, ...), the headline numbers of `ddt.tracking.summary_row` (`fid`, `isc_mean`,
`precision`, `recall`, `step`, `train.*`, `sample.*`), and `run` / `group`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

from ddt.tracking import flatten, summary_row


def run_row(results: dict) -> dict:
    """One DataFrame row of a results.json."""
    row = flatten(results.get("config") or {})
    row.update(summary_row(results))
    row["run"] = Path(results.get("run_dir", "")).name
    row["run_dir"] = results.get("run_dir")
    row["model.parameters"] = (results.get("model") or {}).get("parameters")
    return row


def load_runs(*sweep_dirs: str | Path, completed_only: bool = True) -> pd.DataFrame:
    """The runs (results.json files) under the given sweep or run folders."""
    rows = []
    for sweep in sweep_dirs:
        sweep = Path(sweep)
        if not sweep.exists():
            raise FileNotFoundError(f"sweep folder {sweep} does not exist")
        for path in sorted(sweep.rglob("results.json")):
            results = json.loads(path.read_text())
            if completed_only and results.get("status") != "completed":
                continue
            row = run_row({"run_dir": str(path.parent), **results})
            row["group"] = sweep.name
            rows.append(row)
    return _frame(rows)


def wandb_rows(runs: Iterable) -> pd.DataFrame:
    """Rows of W&B runs (wandb.Api() runs, or analysis.wandb_offline.OfflineRun): config + summary."""
    rows = []
    for run in runs:
        summary = dict(run.summary)
        row = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        row.update({k: v for k, v in summary.items() if not k.startswith("_") and "/" not in k})
        row["run"], row["group"], row["wandb_id"] = run.name, run.group, run.id
        rows.append(row)
    return _frame(rows)


def load_wandb(path: str, group: str | None = None, filters: dict | None = None,
               completed_only: bool = True) -> pd.DataFrame:
    """Runs of a W&B project `entity/project` (optionally one group and extra Mongo-style filters)."""
    import wandb

    query = dict(filters or {})
    if group:
        query["group"] = group
    frame = wandb_rows(wandb.Api().runs(path, filters=query))
    return frame[frame["status"] == "completed"] if completed_only and "status" in frame else frame


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    sort = [c for c in ("model.preset", "model.encoder_depth", "sampler.sharing", "sampler.num_recompute") if c in frame]
    return frame.sort_values(sort, kind="stable").reset_index(drop=True) if sort and len(frame) else frame
