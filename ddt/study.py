"""A successive-halving study run locally as one command (issue 42): each rung's points as ordinary runs, then the
decision at the rung (ddt.halving), the pruned points' ledgers, and on to the next rung.

    python launch.py -m +halving=on 'halving.rungs=[20,60]' model.encoder_depth=2,4,6,8 seed=0,1   # the study
    python -m ddt.study decide STUDY_DIR --rung 20     # the decision at a rung (what a SLURM decision job runs)
    python -m ddt.study revive STUDY_DIR CONFIG_ID     # a pruned configuration goes on at the next run of the study
    python -m ddt.study drop STUDY_DIR RUN             # a point that cannot finish leaves the study's decisions
    python -m ddt.study show STUDY_DIR                 # the rung table, the best at the last rung, device-hours

Every point is an ordinary run in its own folder (`launch.py <its overrides> train.max_steps=RUNG
hydra.run.dir=<folder>`, a subprocess): its own .hydra, owner lock, ledger and resume; reaching the next rung
is the suite's extension in place, bit-equal to a run trained there in one go. What the study adds lives in
STUDY_DIR/halving/: study.json (rungs, eta, metric, the points), rung_<step>.json (the decisions, written once),
revived.json and dropped.json (the user's word). Re-running the command at any moment is safe: a point that has
reached a rung is not trained again, and a written decision is read back, never taken again.
Hydra-free and torch-free (the runs are subprocesses).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ddt.config import names_run, run_subdir
from ddt.errors import Interrupted, UsageError
from ddt.files import atomic_write_json
from ddt.halving import (DECISIONS, STOPPED, RungDecision, decide_rung, decision_path, read_decisions, record_decision,
                         rung_table, study_cost)
from ddt.ledger import Ledger, now, read_json, read_point

LAUNCH = Path(__file__).resolve().parents[1] / "launch.py"
STUDY, REVIVED, DROPPED = "study.json", "revived.json", "dropped.json"  # in STUDY_DIR/halving/
# Overrides a point's run does not take from the study's command line: the study sets the length (the rung)
# and the folder; the sweep's and launcher's settings are the study's, not the run's.
NOT_PASSED = ("halving", "train.max_steps", "hydra.sweep", "hydra.sweeper", "hydra.launcher", "hydra/launcher",
              "hydra/sweeper", "hydra.mode", "hydra.run")


@dataclass(frozen=True)
class Point:
    """One configuration x seed of the study: its run folder's name, overrides, config_id and seed."""
    name: str
    overrides: list
    config_id: str
    seed: int | None = None


@dataclass(frozen=True)
class Study:
    """A study as STUDY_DIR/halving/study.json records it."""
    study_dir: Path
    rungs: list
    eta: int
    metric: str
    points: list  # Point
    command: list = field(default_factory=list)  # launch.py's arguments: what a SLURM decision job runs again
    cwd: str | None = None  # where the command was given (its relative paths)

    def run_dir(self, point: Point) -> Path:
        """The run folder of a point."""
        return self.study_dir / point.name

    def open_rung(self) -> int:
        """The first rung whose decision is not written yet (the last rung, the full length, once all are)."""
        return next((r for r in self.rungs[:-1] if not decision_path(self.study_dir, r).exists()), self.rungs[-1])


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def passed_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides of a study point that its run takes (the halving keys, train.max_steps and sweep settings left out)."""
    return [o for o in overrides if not any(_key(o) == k or _key(o).startswith((f"{k}.", f"{k}/")) for k in NOT_PASSED)]


def record_study(study_dir: str | Path, rungs: Sequence[int], eta: int, metric: str, points: Sequence[Point],
                 command: Sequence[str] = (), cwd: str | Path | None = None) -> Study:
    """Write STUDY_DIR/halving/study.json, or check a re-run against it (a study's rungs and points stay once decided);
    `command` (launch.py's arguments) and `cwd` are what a SLURM decision job runs again."""
    study = Study(Path(study_dir), list(rungs), int(eta), metric, list(points), list(command), str(cwd or os.getcwd()))
    path = Path(study_dir) / DECISIONS / STUDY
    if path.exists():
        old = read_study(study_dir)
        decided = bool(read_decisions(study_dir))
        same = (old.rungs, old.eta, old.metric) == (study.rungs, study.eta, study.metric)
        if decided and not same:
            raise UsageError(f"halving.rungs={_list(rungs)} halving.eta={eta} halving.metric={metric}: the study in "
                             f"{study_dir} was decided with halving.rungs={_list(old.rungs)} halving.eta={old.eta} "
                             f"halving.metric={old.metric} ({path}); use those, or another name= for a new study")
        if decided and {p.name for p in old.points} != {p.name for p in points}:
            raise UsageError(f"the study in {study_dir} was decided over {len(old.points)} points ({path}); this "
                             f"command has {len(points)} others: give the same sweep, or another name= for a new study")
        if same and old.points == study.points and (old.command, old.cwd) == (study.command, study.cwd):
            return old  # nothing to write: a re-run leaves the file as it was
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"rungs": study.rungs, "eta": study.eta, "metric": study.metric,
                       "points": [asdict(p) for p in study.points], "command": study.command, "cwd": study.cwd}, path)
    return study


def _list(values: Sequence) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def is_study(folder: str | Path) -> bool:
    """Whether a folder holds a halving study (its halving/study.json or a decision)."""
    folder = Path(folder) / DECISIONS
    return (folder / STUDY).exists() or any(folder.glob("rung_*.json"))


def read_study(study_dir: str | Path) -> Study:
    """The study STUDY_DIR/halving/study.json records."""
    path = Path(study_dir) / DECISIONS / STUDY
    data = read_json(path)
    if not data:
        raise UsageError(f"{path} does not exist: {study_dir} is not a halving study (start one with "
                         f"python launch.py -m +halving=on 'halving.rungs=[...]' ...)")
    return Study(Path(study_dir), data["rungs"], data["eta"], data["metric"], [Point(**p) for p in data["points"]],
                 data.get("command", []), data.get("cwd"))


def revived(study_dir: str | Path) -> dict[str, int]:
    """{config_id: the rung whose cut the user overrode} (STUDY_DIR/halving/revived.json)."""
    return {cid: entry["rung"] for cid, entry in read_json(Path(study_dir) / DECISIONS / REVIVED).items()}


def dropped(study_dir: str | Path) -> list[str]:
    """The run names the user dropped from the study's decisions (STUDY_DIR/halving/dropped.json)."""
    return read_json(Path(study_dir) / DECISIONS / DROPPED).get("runs", [])


def pruned_before(study: Study, rung: int) -> dict[str, tuple[int, object]]:
    """{config_id: (rung, its ConfigDecision)} of the configurations cut at a rung before `rung` and not revived."""
    back, out = revived(study.study_dir), {}
    for at, decision in read_decisions(study.study_dir).items():
        if at >= rung:
            continue
        for c in decision.configs:
            if not c.kept and c.rule != "dropped" and back.get(c.config_id) != at and c.config_id not in out:
                out[c.config_id] = (at, c)
    return out


def running(study: Study, rung: int) -> list[Point]:
    """The points that train to `rung`: neither their configuration pruned before it nor the point dropped."""
    cut, gone = pruned_before(study, rung), set(dropped(study.study_dir))
    return [p for p in study.points if p.config_id not in cut and p.name not in gone]


def runs_of(study: Study, states: dict[str, str] | None = None) -> list[dict]:
    """Every point's results.json (with run_dir, config_id, seed and its state), as ddt.halving reads them. The state
    is `states`' (ddt.status's, which knows SLURM: the caller passes it, no import cycle), else the ledger's last."""
    out, states = [], states or {}
    for p in study.points:
        point = read_point(study.run_dir(p))
        results = {**point["results"], "run_dir": str(study.run_dir(p))}
        results.setdefault("config_id", p.config_id)  # a point that never started still names its configuration
        results.setdefault("config", {"seed": p.seed})
        events = point["ledger"].get("events") or []
        out.append({**results, "state": states.get(p.name) or (events[-1]["state"] if events else "not_started")})
    return out


def reached(results: dict, rung: int) -> bool:
    """Whether a point's run has completed training to `rung` or beyond (it is not trained again for it)."""
    return results.get("status") == "completed" and ((results.get("train") or {}).get("step") or 0) >= rung


def decide(study_dir: str | Path, rung: int, states: dict[str, str] | None = None) -> RungDecision:
    """The decision at `rung`: the written one, else taken now over the points (their `states` as runs_of takes them)
    and written once; the pruned points' ledgers then say `pruned`. A blocked decision is returned, not written."""
    study = read_study(study_dir)
    if rung not in study.rungs[:-1]:
        raise UsageError(f"--rung {rung} is not a decided rung of {study_dir}: the rungs are {_list(study.rungs)} "
                         f"and the last one, the full length, is not decided")
    path = decision_path(study_dir, rung)
    if path.exists():
        decision = RungDecision.from_json(read_json(path))
    else:
        decision = decide_rung(runs_of(study, states), rung, eta=study.eta, metric=study.metric,
                               dropped=dropped(study_dir), pruned=pruned_before(study, rung))
        if decision.status != "decided":
            return decision
        decision = record_decision(study_dir, rung, decision)  # a racing job's decision wins if it came first
    mark_pruned(study, decision)
    return decision


def mark_pruned(study: Study, decision: RungDecision) -> list[str]:
    """Enter state `pruned` (rung, value, interval, cut, rule) in the ledger of each point the decision cuts; once."""
    back, marked = revived(study.study_dir), []
    for c in decision.configs:
        if c.kept or c.rule == "dropped" or back.get(c.config_id) == decision.rung:
            continue
        for name in c.runs:
            ledger = Ledger(study.study_dir / name)
            if any(e["state"] == "pruned" and e.get("rung") == decision.rung for e in ledger.data["events"]):
                continue  # a re-run: the ledger says so already
            ledger.enter("pruned", rung=decision.rung, metric=decision.metric, value=c.value, ci95=c.ci95,
                         interval=c.interval, cut=decision.cut, rule=c.rule, reason=c.reason, config_id=c.config_id)
            marked.append(name)
    return marked


def revive(study_dir: str | Path, config_id: str) -> list[str]:
    """Mark a pruned configuration revived: the next run of the study command extends its points in place."""
    study = read_study(study_dir)
    cut = pruned_before(study, study.rungs[-1] + 1)
    if config_id not in cut:
        known = ", ".join(sorted(cut)) or "none"
        raise UsageError(f"{config_id} is not a pruned configuration of {study_dir} (pruned: {known}); "
                         f"python -m ddt.study show {study_dir} lists them")
    at = cut[config_id][0]
    path = Path(study_dir) / DECISIONS / REVIVED
    atomic_write_json({**read_json(path), config_id: {"rung": at, "time": now()}}, path)
    names = [p.name for p in study.points if p.config_id == config_id]
    for name in names:
        Ledger(study.study_dir / name).enter("revived", rung=at, config_id=config_id)
    return names


def drop(study_dir: str | Path, run: str) -> None:
    """Leave a point out of the study's decisions from now on (a point that failed and will not be resubmitted)."""
    study = read_study(study_dir)
    name = Path(run).name
    if name not in {p.name for p in study.points}:
        raise UsageError(f"{run} is not a point of the study in {study_dir}; python -m ddt.study show {study_dir} "
                         f"lists them")
    path = Path(study_dir) / DECISIONS / DROPPED
    atomic_write_json({"runs": sorted({*dropped(study_dir), name})}, path)


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "\\'") + "'"  # a folder name holds commas and '=': quoted for Hydra


def train_command(study: Study, point: Point, rung: int) -> list[str]:
    """The command that trains a point to `rung` in its own folder: an ordinary single run of launch.py."""
    return [sys.executable, str(LAUNCH), *passed_overrides(point.overrides), f"train.max_steps={rung}",
            f"hydra.run.dir={_quoted(study.run_dir(point))}"]


def train_commands(study: Study, points: Sequence[Point], rung: int) -> list[tuple[list[str], list[Point]]]:
    """The commands that train `points` to `rung`: one launch.py multirun over the seeds of each configuration
    (ordinary sweep points in the same folders, one process start for all seeds), else one single run per point."""
    singles, groups = [], {}
    for p in points:
        passed = passed_overrides(p.overrides)
        seeds = [o.split("=", 1)[1] for o in passed if _key(o) == "seed"]
        rest = tuple(o for o in passed if _key(o) != "seed")
        # the multirun names the folder by the same rule; where it would not give this point's folder, run it alone
        if len(seeds) != 1 or run_subdir([*passed, f"train.max_steps={rung}"]) != p.name:
            singles.append(p)
        else:
            groups.setdefault(rest, []).append((p, seeds[0]))
    commands = [(train_command(study, p, rung), [p]) for p in singles]
    commands += [([sys.executable, str(LAUNCH), "-m", *rest, f"seed={','.join(seed for _, seed in members)}",
                   f"train.max_steps={rung}", f"hydra.sweep.dir={_quoted(study.study_dir)}"], [p for p, _ in members])
                 for rest, members in groups.items()]
    return commands


def run_point(cmd: list[str]) -> int:
    """Run one point's command; a SIGTERM to the study (launch.py raises Interrupted) is passed on to the point,
    which saves and stops, before the study stops (Ctrl-C reaches both from the terminal already)."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except Interrupted as err:
        if err.signum == signal.SIGTERM and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        raise


def run_study(study: Study, say: Callable[[str], None] | None = None,
              run: Callable[[list[str]], int] | None = None) -> int:
    """Every rung in turn: train the points still running to it (subprocesses), decide, mark the pruned; 0 when the
    study is through, 1 when a point failed or a decision is blocked (the same command resumes), 130/143 interrupted."""
    say = say or (lambda line: print(f"halving: {line}", file=sys.stderr, flush=True))
    run = run or run_point
    start = time.perf_counter()
    for rung in study.rungs:
        points = running(study, rung)
        results = {r["run_dir"]: r for r in runs_of(study)}
        todo = [p for p in points if not reached(results[str(study.run_dir(p))], rung)]
        say(f"rung {rung}: {len(points)} point(s) running, {len(todo)} to train to step {rung}")
        for cmd, members in train_commands(study, todo, rung):
            say(f"rung {rung}: {', '.join(p.name for p in members)} to step {rung}")
            code = run(cmd)
            if code in (130, 143):  # Ctrl-C / SIGTERM: the run saved what it could; the same command resumes
                say(f"interrupted at rung {rung}; run the same command again to resume")
                return code
        results = {r["run_dir"]: r for r in runs_of(study)}
        failed = [(p, results[str(study.run_dir(p))]) for p in points if not reached(results[str(study.run_dir(p))], rung)]
        for p, r in failed:
            why = (r.get("error") or r.get("state") or "no results").splitlines()[0]
            say(f"rung {rung}: {p.name} did not reach step {rung} ({r.get('state')}: {why}); it blocks the decision: "
                f"run the same command again to retry it, or python -m ddt.study drop {study.study_dir} {p.name} "
                f"(log: {study.run_dir(p) / 'launch.log'})")
        if failed:
            return 1
        if rung == study.rungs[-1]:
            break
        decision = decide(study.study_dir, rung)
        if decision.status != "decided":
            for b in decision.blocked:
                say(f"rung {rung}: decision blocked by {b['run']} ({b['reason']}); resubmit it (run the same command "
                    f"again) or python -m ddt.study drop {study.study_dir} {b['run']}")
            return 1
        labels = config_labels(study)
        say(f"rung {rung}: kept {', '.join(labels.get(c, c) for c in decision.kept)}; pruned "
            f"{', '.join(labels.get(c, c) for c in decision.pruned) or 'none'} ({decision_path(study.study_dir, rung)})")
    say(f"every rung is through ({time.perf_counter() - start:.1f} s this command)")
    return 0


def config_labels(study: Study) -> dict[str, str]:
    """{config_id: the overrides that set it apart from the study's other configurations} (its id when none do)."""
    named = {}
    for p in study.points:
        named.setdefault(p.config_id, {o for o in p.overrides if names_run(_key(o)) and _key(o) != "seed"})
    common = set.intersection(*named.values()) if named else set()
    return {cid: ",".join(sorted(items - common)) or cid for cid, items in named.items()}


def final_ranking(study: Study, runs: Sequence[dict] | None = None) -> RungDecision | None:
    """The configurations that reached the last rung, best first (decide_rung's ranking, not recorded); None before."""
    last = study.rungs[-1]
    runs = runs_of(study) if runs is None else runs
    gone = set(dropped(study.study_dir))
    mine = [r for r in runs if Path(r["run_dir"]).name not in gone]
    ranking = decide_rung(mine, last, eta=study.eta, metric=study.metric, dropped=gone,
                          pruned=pruned_before(study, last))
    return ranking if ranking.status == "decided" else None


def cost_line(cost: dict, last_rung: int) -> str:
    """The device-hours line: spent by the study against the full grid trained to the last rung, and what it saved."""
    if cost.get("full_grid") is None:
        return f"device-hours: {cost['spent']:.4g} spent; no training rate measured yet for the full grid"
    unmeasured = f", {cost['unmeasured']} of them at their configuration's rate" if cost.get("unmeasured") else ""
    return (f"device-hours: {cost['spent']:.4g} spent by the study against {cost['full_grid']:.4g} for the full grid "
            f"({cost['grid']} points to step {last_rung} at the measured rates{unmeasured}): {cost['saving']:.4g} saved "
            f"({cost['saving_share']:.0%}; training alone, evaluations counted in both)")


def study_summary(study_dir: str | Path, states: dict[str, str] | None = None) -> dict:
    """What status and report show of a study: the rung table (with the open rung's failed or cancelled points, which
    block it), the best at the last rung, the device-hours; `states` as runs_of takes them."""
    study = read_study(study_dir)
    runs, labels = runs_of(study, states), config_labels(study)
    decisions = read_decisions(study_dir)
    final = final_ranking(study, runs)
    cost = study_cost([r for r in runs if r.get("train")], study.rungs[-1])
    shown = list(decisions.values())
    rung, names = study.open_rung(), {p.name for p in running(study, study.open_rung())}
    if rung != study.rungs[-1] and any(r["state"] in STOPPED for r in runs if Path(r["run_dir"]).name in names):
        shown.append(decide_rung(runs, rung, eta=study.eta, metric=study.metric, dropped=dropped(study_dir),
                                 pruned=pruned_before(study, rung)))  # not written: blocked until resubmitted or dropped
    lines = [f"halving study {study_dir}: rungs {_list(study.rungs)}, eta {study.eta}, metric {study.metric}",
             rung_table(shown, labels)]
    if final is not None:
        values = "; ".join(f"{labels.get(c.config_id, c.config_id)} {c.value:.4g} ({c.interval}, n={c.n})"
                           for c in final.configs if c.value is not None)
        lines.append(f"at the last rung {study.rungs[-1]} (the full length), best first: {values}")
    else:
        lines.append(f"the last rung {study.rungs[-1]} is not reached yet")
    lines.append(cost_line(cost, study.rungs[-1]))
    best = final.best if final is not None else None
    return {"study_dir": str(study_dir), "rungs": study.rungs, "eta": study.eta, "metric": study.metric,
            "labels": labels, "decisions": {r: d.to_json() for r, d in decisions.items()},
            "revived": revived(study_dir), "dropped": dropped(study_dir),
            "best": best, "best_label": labels.get(best, best) if best else None,
            "final": final.to_json() if final is not None else None, "cost": cost, "text": "\n".join(lines)}


def summary_text(study_dir: str | Path) -> str:
    """The study as text: its rung table, the best configurations at the last rung and the device-hours line."""
    return study_summary(study_dir)["text"]


def main(argv: list[str] | None = None) -> int:
    """The command line: decide a rung, revive a configuration, drop a point, show a study."""
    parser = argparse.ArgumentParser(prog="python -m ddt.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("decide", help="take (or read back) the decision at a rung and mark the pruned points")
    p.add_argument("study_dir", type=Path)
    p.add_argument("--rung", type=int, required=True)
    p = sub.add_parser("revive", help="a pruned configuration goes on at the next run of the study command")
    p.add_argument("study_dir", type=Path)
    p.add_argument("config_id")
    p = sub.add_parser("drop", help="leave a point (a run folder's name) out of the study's decisions")
    p.add_argument("study_dir", type=Path)
    p.add_argument("run")
    p = sub.add_parser("show", help="the rung table, the best at the last rung and the device-hours")
    p.add_argument("study_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "decide":
            decision = decide(args.study_dir, args.rung)
            if decision.status != "decided":
                for b in decision.blocked:
                    print(f"ddt.study: rung {args.rung} blocked by {b['run']} ({b['reason']})", file=sys.stderr)
                return 1
            print(f"rung {args.rung}: kept {' '.join(decision.kept)}; pruned {' '.join(decision.pruned) or 'none'}")
        elif args.command == "revive":
            names = revive(args.study_dir, args.config_id)
            print(f"revived {args.config_id} ({', '.join(names)}): run the study command again to extend it in place")
        elif args.command == "drop":
            drop(args.study_dir, args.run)
            print(f"dropped {Path(args.run).name} from the study's decisions; run the study command again to go on")
        else:
            print(summary_text(args.study_dir))
    except UsageError as err:
        for problem in err.problems:
            print(f"ddt.study: error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
