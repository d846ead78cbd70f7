"""Curve bookkeeping: the EMA weights evaluated every eval.every_steps steps, as points of results.json.

Points are keyed by step (a resumed or requeued run never records one twice); points made with other
sampler or metric settings are set aside, never mixed in. The sampling and scoring are ddt.runner's.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ddt.config import comparable, digest
from ddt.ledger import Results

log = logging.getLogger("ddt.runner")


def kept_steps(run_dir: Path) -> list[int]:
    """The steps of the kept checkpoints (checkpoints/step_N.pt), ascending."""
    names = (p.stem.removeprefix("step_") for p in (run_dir / "checkpoints").glob("step_*.pt"))
    return sorted(int(n) for n in names if n.isdigit())


def point_settings(plain: dict, extractor: dict) -> str:
    """What a curve point's numbers depend on besides the weights: sampler, metrics, seed and extractor."""
    plain = comparable(plain)
    ev = {k: v for k, v in plain["eval"].items() if k != "every_steps"}
    key = {"sampler": plain["sampler"], "eval": ev, "seed": plain["seed"], "extractor": extractor.get("sha256")}
    return digest(key)


def set_aside_stale_points(results: Results, settings: str) -> None:
    """Move curve points made with other sampler/metric settings to `curve_stale` (kept, not mixed in)."""
    curve = results.data.get("curve", [])
    stale = [p for p in curve if p.get("settings") != settings]
    if stale:
        log.warning("%d curve point(s) were made with other sampler or eval settings; moved to curve_stale in "
                    "results.json and recomputed where checkpoints allow", len(stale))
        results.update(curve=[p for p in curve if p.get("settings") == settings],
                       curve_stale=results.data.get("curve_stale", []) + stale)


def record_point(results: Results, point: dict) -> None:
    """Add a curve point keyed by step: never two points for one step; the final evaluation's point wins."""
    points = {p["step"]: p for p in results.data.get("curve", [])}
    if point["final"] or not points.get(point["step"], {}).get("final"):
        points[point["step"]] = point
    if point["final"]:  # an earlier final evaluation (before training went on) becomes an ordinary point
        points = {s: {**p, "final": s == point["step"]} for s, p in points.items()}
    results.update(curve=[points[s] for s in sorted(points)])


def curve_cost(results: dict) -> dict:
    """Time spent on intermediate curve points and its share of the run (training + all evaluations)."""
    points = results.get("curve", [])
    curve_s = sum(p.get("wall_time_s", 0.0) for p in points if not p["final"])
    train_s = (results.get("train") or {}).get("total_wall_time_s", 0.0)
    final_s = ((results.get("sample") or {}).get("wall_time_s", 0.0)
               + (results.get("evaluate") or {}).get("wall_time_s", 0.0))
    total = curve_s + train_s + final_s
    return {"intermediate_points": sum(not p["final"] for p in points), "wall_time_s": round(curve_s, 3),
            "train_wall_time_s": train_s, "final_eval_wall_time_s": round(final_s, 3),
            "run_wall_time_s": round(total, 3), "share": round(curve_s / total, 4) if total else None}
