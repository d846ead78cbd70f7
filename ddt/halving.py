"""Successive halving over FID curves, seed-aware (issue 42): the decision at a rung, its record, its cost.

    decision = decide_rung(runs, rung=20000, eta=3, metric="fid")   # runs: results.json dicts (with run_dir)
    decision = record_decision(study_dir, 20000, decision)          # written once; a re-run gets the first
    print(rung_table(read_decisions(study_dir).values()))
    study_cost(runs, last_rung=400000)                               # device-hours spent vs the full grid

The unit of decision is a configuration (config_id), aggregated over its seeds by analysis.stats.aggregate
(mean and Student-t 95% interval). Of the n configurations still running, one survives the rung when it
is among the best ceil(n/eta) (ties at the cut kept), or when its 95% interval overlaps the best one's.
With one seed there is no interval, and rank alone decides. A point that has no value at the rung (failed,
cancelled, not reached, another sample count) blocks the decision until it is resubmitted or dropped.
Torch- and Hydra-free: the status command and a small SLURM decision job import it.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

from analysis.results import identity
from analysis.stats import aggregate, format_stat, intervals_apart
from ddt.files import atomic_write_json
from ddt.ledger import device_hours, read_json
from ddt.tracking import HIGHER_IS_BETTER

DECISIONS = "halving"  # study_dir/halving/rung_<step>.json: one file per rung, written once
STOPPED = ("failed", "cancelled", "interrupted")  # states in which a point will not reach the rung by itself


@dataclass(frozen=True)
class ConfigDecision:
    """One configuration at a rung: its value over seeds, rank, and whether (and by which rule) it goes on."""
    config_id: str
    kept: bool
    rule: str  # rank | tie at the cut | overlap | cut | dropped
    reason: str
    value: float | None
    ci95: float | None  # None: one seed, no interval
    n: int
    seeds: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    rank: int | None = None

    @property
    def interval(self) -> str:
        """The 95% interval in words: '± x' or 'one seed'."""
        return "one seed" if self.ci95 is None else f"± {self.ci95:.4g}"


@dataclass(frozen=True)
class RungDecision:
    """The decision at one rung for every configuration still running, or why it cannot be taken yet."""
    rung: int
    metric: str
    higher_is_better: bool
    eta: int
    status: str  # decided | blocked
    num_samples: int | None = None
    n: int = 0  # configurations ranked
    keep: int = 0  # ceil(n / eta)
    cut: float | None = None  # the keep-th best value
    best: str | None = None
    configs: list = field(default_factory=list)  # ConfigDecision, best first
    blocked: list = field(default_factory=list)  # {"run", "config_id", "seed", "reason"} of each missing point
    dropped: list = field(default_factory=list)  # run names the user dropped

    @property
    def kept(self) -> list[str]:
        """The config_ids that go on to the next rung."""
        return [c.config_id for c in self.configs if c.kept]

    @property
    def pruned(self) -> list[str]:
        """The config_ids that stop at this rung."""
        return [c.config_id for c in self.configs if not c.kept]

    def to_json(self) -> dict:
        """A plain dict for JSON (NaN never appears: a missing interval is None)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> RungDecision:
        """The decision a decisions file holds."""
        return cls(**{**data, "configs": [ConfigDecision(**c) for c in data.get("configs", [])]})


def decide_rung(runs: Sequence[dict], rung: int, *, eta: int = 3, metric: str = "fid",
                dropped: Iterable[str] = (), pruned: Iterable[str] = (),
                num_samples: int | None = None) -> RungDecision:
    """The decision at `rung` (pure): runs are results.json dicts with run_dir (and ddt.status's `state`)."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"halving metric {metric!r} has no known direction; use one of {sorted(HIGHER_IS_BETTER)}")
    if not isinstance(eta, int) or eta < 2:
        raise ValueError(f"eta must be an integer >= 2, got {eta!r}")
    higher, dropped, pruned = HIGHER_IS_BETTER[metric], {Path(d).name for d in dropped}, set(pruned)
    points, missing, dropped_runs, seen = [], [], [], {}
    for run in runs:
        name, cid, seed = Path(run["run_dir"]).name, identity(run), (run.get("config") or {}).get("seed")
        if cid in pruned:  # cut at an earlier rung: not running, never blocks
            continue
        if name in dropped:
            dropped_runs.append((name, cid))
            continue
        if (cid, seed) in seen:
            raise ValueError(f"{seen[cid, seed]} and {name} are both config {cid} seed {seed}: pass one run each")
        seen[cid, seed] = name
        point = next((p for p in run.get("curve") or [] if p.get("step") == rung), {})
        value = point.get(metric)
        entry = {"run": name, "config_id": cid, "seed": seed}
        if value is None or not math.isfinite(value):
            state = run.get("state") or run.get("status")
            missing.append({**entry, "reason": state if state in STOPPED else f"not reached ({state or 'no results'})"})
        else:
            points.append({**entry, "value": float(value), "num_samples": point.get("num_samples")})
    counts = Counter(p["num_samples"] for p in points)
    # The rung's sample count: the one asked for, else the one most points have (a tie: the larger).
    target = num_samples if num_samples is not None else max(counts, key=lambda c: (counts[c], c or 0), default=None)
    missing += [{**{k: p[k] for k in ("run", "config_id", "seed")},
                 "reason": f"num_samples {p['num_samples']}, the rung's is {target}"}
                for p in points if p["num_samples"] != target]
    head = dict(rung=rung, metric=metric, higher_is_better=higher, eta=eta, num_samples=target,
                dropped=sorted(name for name, _ in dropped_runs))
    if missing:
        return RungDecision(status="blocked", blocked=missing, **head)
    if not points:
        raise ValueError(f"no configuration has a {metric} value at rung {rung}")
    frame = pd.DataFrame([{"config_id": p["config_id"], "seed": p["seed"], "step": rung, metric: p["value"]}
                          for p in points])
    agg = aggregate(frame, metrics=[metric]).to_dict("records")
    runs_of = {cid: sorted(p["run"] for p in points if p["config_id"] == cid) for cid in {p["config_id"] for p in points}}
    order = sorted(agg, key=lambda r: (-r[f"{metric}_mean"] if higher else r[f"{metric}_mean"], r["config_id"]))
    n, keep = len(order), math.ceil(len(order) / eta)
    value = {r["config_id"]: float(r[f"{metric}_mean"]) for r in order}
    ci = {r["config_id"]: float(r[f"{metric}_ci95"]) for r in order}
    cut, best = value[order[keep - 1]["config_id"]], order[0]["config_id"]

    def better(a: float, b: float) -> bool:
        return a > b if higher else a < b

    at_least_cut = sum(not better(cut, v) for v in value.values())  # configurations as good as the cut or better
    decisions = []
    for row in order:
        cid, v = row["config_id"], value[row["config_id"]]
        rank = 1 + sum(better(w, v) for w in value.values())  # tied values share a rank
        one_seed = not (math.isfinite(ci[cid]) and math.isfinite(ci[best]))
        where = f"rank {rank} of {n}, {metric} {v:.4g} vs the cut {cut:.4g} (best {keep} of {n} kept)"
        if not better(cut, v):
            rule = "tie at the cut" if v == cut and at_least_cut > keep else "rank"
            kept, reason = True, where + ("; tied with the cut, kept" if rule != "rank" else "")
            reason += "" if math.isfinite(ci[cid]) else "; one seed, no interval: rank alone decides"
        elif not one_seed and not intervals_apart(v, ci[cid], value[best], ci[best]):
            kept, rule = True, "overlap"
            reason = f"{where}; its 95% interval ± {ci[cid]:.4g} overlaps the best's ({value[best]:.4g} ± {ci[best]:.4g})"
        else:
            kept, rule = False, "cut"
            reason = where + ("; one seed, no interval: rank alone decides" if one_seed else
                              f"; its 95% interval ± {ci[cid]:.4g} is apart from the best's "
                              f"({value[best]:.4g} ± {ci[best]:.4g})")
        decisions.append(ConfigDecision(cid, kept, rule, reason, v, ci[cid] if math.isfinite(ci[cid]) else None,
                                        int(row["n"]), list(row["seeds"]), runs_of[cid], rank))
    gone = sorted({cid for _, cid in dropped_runs} - set(value))  # every seed dropped: out of the study
    decisions += [ConfigDecision(cid, False, "dropped", "every seed dropped by the user", None, None, 0,
                                 runs=sorted(r for r, c in dropped_runs if c == cid)) for cid in gone]
    return RungDecision(status="decided", n=n, keep=keep, cut=cut, best=best, configs=decisions, **head)


def decision_path(study_dir: str | Path, rung: int) -> Path:
    """Where the decision at `rung` is written."""
    return Path(study_dir) / DECISIONS / f"rung_{rung}.json"


def record_decision(study_dir: str | Path, rung: int, decision: RungDecision) -> RungDecision:
    """Write the decision at `rung` once; if one is already written, return it unchanged (this one is not written)."""
    path = decision_path(study_dir, rung)
    if path.exists():
        return RungDecision.from_json(read_json(path))
    if decision.status != "decided" or decision.rung != rung:
        raise ValueError(f"only a taken decision for rung {rung} is recorded (got {decision.status} at {decision.rung})")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    atomic_write_json(decision.to_json(), tmp)
    try:  # link, not rename: two decision jobs racing on one rung cannot replace a written decision
        os.link(tmp, path)
    except FileExistsError:
        return RungDecision.from_json(read_json(path))
    finally:
        tmp.unlink(missing_ok=True)
    return decision


def read_decisions(study_dir: str | Path) -> dict[int, RungDecision]:
    """The decisions written for a study, by rung (ascending)."""
    found = {}
    for path in (Path(study_dir) / DECISIONS).glob("rung_*.json"):
        decision = RungDecision.from_json(json.loads(path.read_text()))
        found[decision.rung] = decision
    return dict(sorted(found.items()))


def study_cost(runs: Sequence[dict], last_rung: int) -> dict:
    """Device-hours the study spent against the full grid: every configuration x seed trained to `last_rung`."""
    rates, spent, spent_train = {}, 0.0, 0.0
    for run in runs:
        hours, step = device_hours(run), (run.get("train") or {}).get("step")
        spent += hours["total"]
        spent_train += hours.get("train", 0.0)
        if step and "train" in hours:  # device-hours per step, as this run measured it
            rates[identity(run), (run.get("config") or {}).get("seed")] = hours["train"] / step
    configs = sorted({identity(r) for r in runs})
    seeds = sorted({(r.get("config") or {}).get("seed") for r in runs}, key=str)
    if not rates:
        return {"spent": round(spent, 6), "spent_train": round(spent_train, 6), "full_grid": None, "saving": None,
                "saving_share": None, "grid": len(configs) * len(seeds), "unmeasured": len(configs) * len(seeds)}
    study_rate = sum(rates.values()) / len(rates)
    full_train, unmeasured = 0.0, 0
    for cid in configs:
        own = [r for (c, _), r in rates.items() if c == cid]
        for seed in seeds:  # a point with no measured rate: its configuration's mean rate, else the study's
            rate = rates.get((cid, seed))
            unmeasured += rate is None
            full_train += last_rung * (rate if rate is not None else sum(own) / len(own) if own else study_rate)
    # Evaluations are counted as spent in both: the saving is training alone (the full grid would also
    # have evaluated the pruned points at later rungs, so this is a lower bound).
    full = full_train + spent - spent_train
    return {"spent": round(spent, 6), "spent_train": round(spent_train, 6), "full_grid": round(full, 6),
            "full_grid_train": round(full_train, 6), "saving": round(full - spent, 6),
            "saving_share": round((full - spent) / full, 4) if full else None,
            "grid": len(configs) * len(seeds), "unmeasured": unmeasured}


def rung_table(decisions: Iterable[RungDecision], labels: Mapping[str, str] | None = None, digits: int = 2) -> str:
    """Plain text, one row per configuration: value ± interval and kept/pruned at each rung, then why."""
    decisions = sorted(decisions, key=lambda d: d.rung)
    if not decisions:
        return "halving: no rung decided yet"
    labels = labels or {}
    cells: dict[str, dict[int, str]] = {}
    why: dict[str, str] = {}
    for d in decisions:
        for c in d.configs:
            value = format_stat(c.value, c.ci95 if c.ci95 is not None else math.nan, c.n, digits, text=True)
            value = value.replace(" (n=1)", " (one seed)") if c.n == 1 else value
            cells.setdefault(c.config_id, {})[d.rung] = f"{value or '-'} {'kept' if c.kept else 'PRUNED'}"
            why[c.config_id] = f"{'kept' if c.kept else 'pruned'} at {d.rung} ({c.rule}): {c.reason}"
        for b in d.blocked:
            cells.setdefault(b["config_id"], {})[d.rung] = f"blocked: {b['run']} {b['reason']}"
            why.setdefault(b["config_id"], f"rung {d.rung} blocked until the point is resubmitted or dropped")
    rungs = [d.rung for d in decisions]
    last = {c.config_id: (c.kept, c.rank or 0) for d in decisions for c in d.configs}
    order = sorted(cells, key=lambda cid: (not last.get(cid, (True, 0))[0], last.get(cid, (True, 0))[1], cid))
    rows = [["configuration", *(f"rung {r}" for r in rungs), "why"]]
    rows += [[labels.get(cid, cid), *(cells[cid].get(r, "") for r in rungs), why[cid]] for cid in order]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    head = decisions[-1]
    lines = [f"halving on {head.metric} ({'higher' if head.higher_is_better else 'lower'} is better), eta {head.eta}"]
    lines += ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows]
    return "\n".join(lines)
