"""Every run of one or more sweeps as one pandas DataFrame, from run folders or from W&B.

    from analysis.results import load_runs, load_curves, load_wandb, aggregate
    df = load_runs("runs/quickstart")                                  # results.json of each run
    df = load_wandb("entity/ddt-ablations", group="quickstart-20261125-212801")   # wandb.Api()
    curves = load_curves("runs/quickstart")                            # one row per (run, curve point)
    agg = aggregate(df)                                                # mean / std / ci95 over seeds

Both run loaders give the same columns: the resolved config flattened to dotted keys
(`model.encoder_depth`, `sampler.sharing`, ...), the headline numbers of `ddt.tracking.summary_row`
(`fid`, `isc_mean`, `kid_mean`, `precision`, `recall`, `fd_dinov2` where evaluated, `step`, `config_id`,
`train.*`, `sample.*`), `num_samples` (the images behind the metrics), and `run` / `group`. The curve loaders (`load_curves`, `wandb_curves`,
`load_wandb_curves`) give the config columns and run names, then one row per evaluation point:
`step`, the metrics, `num_samples`, `wall_time_s`, `final`. A results.json without a "curve" (written
before curves existed) counts as one point, its final metrics at its step. `aggregate` and `separated`
live in analysis.stats.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from analysis.stats import aggregate, separated, sort_by_setting  # noqa: F401  (the loaders' companions)
from ddt.config import config_id
from ddt.tracking import METRICS, flatten, summary_row, unflatten

log = logging.getLogger("analysis.results")

CURVE_FIELDS = ("step", *METRICS, "num_samples", "wall_time_s", "final")


def run_row(results: dict) -> dict:
    """One DataFrame row of a results.json."""
    row = flatten(results.get("config") or {})
    row.update(summary_row(results))
    row.update(_run_names(results), config_id=identity(results))
    return _with_sample_count(row)


def _with_sample_count(row: dict) -> dict:
    """The row with `num_samples` (images behind its metrics); a record without it has the configured count."""
    if row.get("num_samples") is None and row.get("eval.num_samples") is not None:
        row["num_samples"] = row["eval.num_samples"]
    return row


# The groups a config must hold for its config_id to be recomputed (a partial W&B config keeps the logged one).
CONFIG_GROUPS = ("model", "data", "train", "sampler", "eval")


def identity(results: dict) -> str | None:
    """The run's config_id under today's rule (recomputed from its config; the recorded one without a full config)."""
    config = results.get("config") or {}
    whole = all(isinstance(config.get(group), dict) for group in CONFIG_GROUPS)
    return config_id(config) if whole else results.get("config_id")


def weights(results: dict) -> str:
    """What a run's numbers come from besides its config: the checkpoint it sampled, or what it trained from."""
    config = results.get("config") or {}
    ckpt = config.get("ckpt")
    where = os.path.normpath(os.path.abspath(os.path.expanduser(ckpt))) if ckpt else None
    if where and "train" not in (results.get("stages") or config.get("stage") or []):
        return f"sampled {where}"
    return f"trained from {where or 'scratch'}"


def sampled_checkpoint(results: dict) -> str:
    """The checkpoint file whose weights a run sampled: its ckpt, or its own checkpoints/last.pt."""
    if weights(results).startswith("sampled "):
        return weights(results).removeprefix("sampled ")
    return os.path.normpath(os.path.abspath(Path(results.get("run_dir", "")) / "checkpoints" / "last.pt"))


def observation(results: dict, trained: dict[str, dict] | None = None) -> tuple:
    """(config_id, seed, weights): runs that share it compute the same numbers at a step (one observation).
    A run that sampled another loaded run's checkpoint (`trained`: run folder -> results) has its weights."""
    own = weights(results)
    if own.startswith("sampled ") and trained:
        owner = trained.get(os.path.dirname(os.path.dirname(own.removeprefix("sampled "))))
        own = weights(owner) if owner else own
    return identity(results), (results.get("config") or {}).get("seed"), own


def curve_rows(results: dict) -> list[dict]:
    """The DataFrame rows of a results.json's curve points (its final metrics alone if it has no curve)."""
    points = results.get("curve")
    if points is None:
        metrics, step = results.get("metrics"), summary_row(results)["step"]
        if not metrics:
            return []
        num_samples = (results.get("evaluate") or {}).get("num_samples")
        points = [{**metrics, "step": step, "num_samples": num_samples, "final": True}]
    setting = flatten(results.get("config") or {})
    setting.update({"status": results.get("status"), "config_id": identity(results)})
    setting.update(_run_names(results))
    return [_curve_row(setting, point) for point in _ordered_curve(points)]


def load_runs(*sweep_dirs: str | Path, completed_only: bool = True, quiet: bool = False) -> pd.DataFrame:
    """The runs (results.json files) under the given sweep or run folders, one per observation."""
    rows = []
    for group, results, kept, _ in _observations(list(_results(sweep_dirs, completed_only))):
        if kept is None:
            rows.append({**run_row(results), "group": group})
        elif not quiet:
            log.warning("%s", duplicate_line(kept, results, "the second is left out"))
    return sort_by_setting(pd.DataFrame(rows))


def load_curves(*sweep_dirs: str | Path, completed_only: bool = True, quiet: bool = False) -> pd.DataFrame:
    """The curve points of the runs under the given sweep or run folders, one row per (observation, step).

    An observation's curve is the curve of one run (its preferred one): runs of different lengths are
    never joined into one line, even when they trained the same recipe and seed."""
    rows = []
    for group, results, kept, _ in _observations(list(_results(sweep_dirs, completed_only))):
        if kept is None:
            rows += [{**row, "group": group} for row in curve_rows(results)]
        elif not quiet:
            log.warning("%s", duplicate_line(kept, results, "the second's curve is left out"))
    return sort_by_setting(pd.DataFrame(rows))


def duplicate_line(kept: dict, dropped: dict, what: str) -> str:
    """One line saying that two runs are one observation and which one counts."""
    cid, seed = identity(kept), (kept.get("config") or {}).get("seed")
    return (f"duplicate: {kept['run_dir']} (step {summary_row(kept)['step']}) and {dropped['run_dir']} "
            f"(step {summary_row(dropped)['step']}) are one observation (config_id {cid}, seed {seed}, same "
            f"weights): counted once; {what}")


def wandb_rows(runs: Iterable, quiet: bool = False) -> pd.DataFrame:
    """Rows of W&B runs (wandb.Api() runs, or analysis.wandb_offline.OfflineRun): config + summary, one per
    observation (config_id recomputed from the logged config, duplicates counted once as load_runs does)."""
    rows = []
    for run, results in _wandb_observations(runs, quiet):
        row = _wandb_setting(run)
        row.update({k: v for k, v in dict(run.summary).items() if not k.startswith("_") and "/" not in k})
        row.update(_wandb_names(run), config_id=identity(results))
        rows.append(_with_sample_count(row))
    return sort_by_setting(pd.DataFrame(rows))


def wandb_curves(runs: Iterable, quiet: bool = False) -> pd.DataFrame:
    """Curve points of W&B runs from their history (`eval/step` -> step, `eval/<metric>` -> metric), one
    run's curve per observation."""
    rows = []
    for run, results in _wandb_observations(runs, quiet):
        setting = {**_wandb_setting(run), "status": dict(run.summary).get("status"), **_wandb_names(run),
                   "config_id": identity(results)}
        rows += [_curve_row(setting, point) for point in _eval_history(run)]
    return sort_by_setting(pd.DataFrame(rows))


def _wandb_observations(runs: Iterable, quiet: bool) -> list[tuple]:
    """(run, its results.json-like record) of the preferred W&B run of each observation; a line per duplicate."""
    runs = list(runs)
    found = [(run.group, _wandb_results(run, i)) for i, run in enumerate(runs)]
    out = []
    for run, (_, results, kept, _) in zip(runs, _observations(found)):
        if kept is None:
            out.append((run, results))
        elif not quiet:
            log.warning("%s", duplicate_line(kept, results, "the second is left out"))
    return out


def _wandb_results(run, order: int) -> dict:
    """The parts of a results.json that identify a W&B run: its logged config nested again, status and step."""
    setting, summary = _wandb_setting(run), dict(run.summary)
    config = unflatten({k: v for k, v in setting.items() if k != "config_id"})
    return {"config": config, "config_id": setting.get("config_id", summary.get("config_id")),
            "status": summary.get("status"), "stages": config.get("stage"), "train": {"step": summary.get("step")},
            "run_dir": run.name, "_mtime": summary.get("_timestamp", order)}


def load_wandb(path: str, group: str | None = None, filters: dict | None = None,
               completed_only: bool = True) -> pd.DataFrame:
    """Runs of a W&B project `entity/project` (optionally one group and extra Mongo-style filters)."""
    return _completed(wandb_rows(_api_runs(path, group, filters)), completed_only)


def load_wandb_curves(path: str, group: str | None = None, filters: dict | None = None,
                      completed_only: bool = True) -> pd.DataFrame:
    """Curve points of the runs of a W&B project (optionally one group), as load_curves gives them."""
    return _completed(wandb_curves(_api_runs(path, group, filters)), completed_only)


def curves_of(curves: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The curve points of the given runs (e.g. after a query on run columns that curve rows lack)."""
    key = "run_dir" if "run_dir" in runs and runs["run_dir"].notna().all() else "wandb_id"
    return curves[curves[key].isin(runs[key])] if len(curves) and key in curves and key in runs else curves


# The `eval/*` fields read from W&B history; each is read on its own because wandb.Api's
# history(keys=...) keeps only the rows holding every key asked for, and a point may lack some.
WANDB_EVAL_FIELDS = (*METRICS, "num_samples")


def _eval_history(run) -> list[dict]:
    """The run's logged evaluation points, ordered by step."""
    points: dict[int, dict] = {}
    for field in WANDB_EVAL_FIELDS:
        key = f"eval/{field}"
        frame = run.history(keys=["eval/step", key])
        if not isinstance(frame, pd.DataFrame) or key not in frame or "eval/step" not in frame:
            continue
        for step, value in frame.dropna(subset=["eval/step", key])[["eval/step", key]].itertuples(index=False):
            points.setdefault(int(step), {"step": int(step)})[field] = value
    return _ordered_curve(points.values())


def _ordered_curve(points: Iterable[dict]) -> list[dict]:
    """Curve points ordered by step, the last record of a step kept (a resumed run may log it twice);
    a point that does not say whether it is the final one is final when it is the last."""
    ordered = sorted({point["step"]: point for point in points}.values(), key=lambda point: point["step"])
    return [{"final": i == len(ordered) - 1, **point} for i, point in enumerate(ordered)]


def _curve_row(setting: dict, point: dict) -> dict:
    return {**setting, **dict.fromkeys(CURVE_FIELDS), **point}  # every curve field a column, missing = NaN


def _run_names(results: dict) -> dict:
    return {"run": Path(results.get("run_dir", "")).name, "run_dir": results.get("run_dir"),
            "model.parameters": (results.get("model") or {}).get("parameters"), "weights": weights(results),
            "sampled": sampled_checkpoint(results) if results.get("run_dir") else None}


def _wandb_setting(run) -> dict:
    return {k: v for k, v in dict(run.config).items() if not k.startswith("_")}


def _wandb_names(run) -> dict:
    return {"run": run.name, "group": run.group, "wandb_id": run.id}


def _results(sweep_dirs: Iterable[str | Path], completed_only: bool) -> Iterator[tuple[str, dict]]:
    """(sweep name, results.json with its run_dir) of every run under the given folders."""
    for sweep in map(Path, sweep_dirs):
        if not sweep.exists():
            raise FileNotFoundError(f"sweep folder {sweep} does not exist")
        for path in sorted(sweep.rglob("results.json")):
            results = json.loads(path.read_text())
            if completed_only and results.get("status") != "completed":
                continue
            yield sweep.name, {"run_dir": str(path.parent), **results, "_mtime": path.stat().st_mtime}


def _observations(found: list[tuple[str, dict]]) -> list[tuple[str, dict, dict | None, tuple]]:
    """(group, results, None or the preferred run of its observation) for each (group, results), in order;
    the preferred run of an observation has more steps, then trained its weights itself, then is the later."""
    trained = {os.path.normpath(os.path.abspath(r["run_dir"])): r for _, r in found if weights(r).startswith("trained")}
    keys = [observation(r, trained) for _, r in found]
    preference = sorted(range(len(found)), key=lambda i: (-(summary_row(found[i][1])["step"] or 0),
                                                           weights(found[i][1]).startswith("sampled "),
                                                           -found[i][1]["_mtime"], i))
    first: dict[tuple, dict] = {}
    kept: dict[int, dict | None] = {}
    for i in preference:
        kept[i] = first.get(keys[i])
        first.setdefault(keys[i], found[i][1])
    return [(group, results, kept[i], keys[i]) for i, (group, results) in enumerate(found)]


def _api_runs(path: str, group: str | None, filters: dict | None):
    import wandb

    query = dict(filters or {})
    if group:
        query["group"] = group
    return wandb.Api().runs(path, filters=query)


def _completed(frame: pd.DataFrame, completed_only: bool) -> pd.DataFrame:
    return frame[frame["status"] == "completed"] if completed_only and "status" in frame else frame
