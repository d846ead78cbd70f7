"""Entry point: compose the Hydra config (conf/) and run its stages (ddt/runner.py).

    python launch.py                                   # the digits quickstart
    python launch.py -m model.encoder_depth=8,16,22    # a sweep, one run directory per value
    python launch.py stage=evaluate ckpt=PATH          # evaluate an existing checkpoint
    python launch.py stage=cache_latents resolution=r256 data.root=/imagenet/train   # SD-VAE latent cache
    python launch.py model=ddt_xl resolution=r256 repa=on data.root=/imagenet/train  # the paper's XL setting

A setting or file at fault stops the run before any work with one line per problem on stderr and exit
status 2, writing nothing (no run folder, no .hydra, no results.json); no traceback unless
HYDRA_FULL_ERROR=1. A run folder held by a live run (its owner.json) is refused the same way.
Ctrl-C / SIGTERM save what they can and exit 130 / 143; the same command resumes.
"""
import logging
import os
import re
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ddt.config import register_resolvers
from ddt.errors import Interrupted, UsageError
from ddt.distributed import process_rank
from ddt.lock import held_problem, live_owner
from ddt.runner import run
from ddt.schema import all_keys, closest

CONF = Path(__file__).resolve().parent / "conf"
MAX_CHECKED_POINTS = 256  # sweep points whose composition is checked before the first job starts
log = logging.getLogger("launch")
exit_codes: list[int] = []
STUDY: dict = {}  # a multirun with +halving=on: its points and settings, which ddt.study runs instead of Hydra's sweep
register_resolvers()


def fail(message: str) -> None:
    """Stop the launch with a usage error: one line on stderr, exit status 2."""
    print(f"launch.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def composition_problem(err: Exception) -> str:
    """Hydra's composition error as one line, with the closest valid key or the group's options."""
    text = str(err)
    missing = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        return f"{group}={option} is not an option of the {group} group; choose one of {', '.join(options)}"
    unknown = re.search(r"full_key: ([\w.]+)", text) or re.search(r"Could not override '([\w.]+)'", text)
    if unknown and ("not in struct" in text or "Could not override" in text):
        key = unknown.group(1)
        return (f"{key} is not a config key{closest(key, all_keys())} (a new key needs +{key}=...; "
                f"every key is listed in docs/configuration.md)")
    return " ".join(text.split("Set the environment variable HYDRA_FULL_ERROR")[0].split())


def preflight(argv: list[str]) -> Path | None:
    """Compose the command line's config (every sweep point, up to a limit) before Hydra starts a job;
    returns the sweep folder of a multirun."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.config_dir \
            or args.config_name or args.config_path or args.experimental_rerun:
        return None  # Hydra's own commands, or another config: Hydra reports its errors itself
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        points = [p for batch in BasicSweeper.split_arguments(parsed, None) for p in batch] if args.multirun \
            else [args.overrides]
        problems, sweep_dir, run_dirs, prepared = [], None, {}, set()
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            for overrides in points[:MAX_CHECKED_POINTS]:
                cfg = compose("config", overrides=overrides, return_hydra_config=True)
                run_dir = Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir if args.multirun \
                    else Path(cfg.hydra.run.dir)
                check_output_dir(run_dir, "hydra.sweep.dir" if args.multirun else "hydra.run.dir")
                problems += renamed_run_problems(run_dir, overrides)
                run_dirs.setdefault(run_dir, []).append(overrides)
                if args.multirun:
                    sweep_dir = Path(cfg.hydra.sweep.dir)
                launcher = str(cfg.hydra.launcher.get("_target_", ""))
                detached = "ddt_detached_launcher" in launcher
                here = not args.multirun or launcher.endswith(("BasicLauncher", ".LocalLauncher"))  # not a SLURM node
                # the detached launcher skips live points itself; under torchrun, rank 0's run holds the folder
                owner = None if detached or process_rank()[0] != 0 else live_owner(run_dir)
                if owner is not None:
                    problems.append(held_problem(run_dir, owner))
                    continue
                halving = cfg.get("halving") if args.multirun else None
                if halving is not None:
                    problems += study_point(cfg, overrides, run_dir, len(points))
                problems += run_problems(cfg, overrides, run_dir, args.multirun, prepared, here)
    except Exception as err:  # composition: unknown key, unknown option, unparsable override
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(composition_problem(err))
    problems += shared_folder_problems(run_dirs)
    if problems and not args.multirun:  # nothing was written: the folder is as it was
        fail("\nlaunch.py: error: ".join(dict.fromkeys(problems)))
    if problems:  # no point starts while one of them is wrong
        fail("\n".join(dict.fromkeys(problems)) + f"\nlaunch.py: error: no sweep point was started "
                                                    f"({len(points)} points); fix the values above")
    if sweep_dir is not None:
        from ddt.ledger import record_sweep_points

        record_sweep_points(sweep_dir, {d: o[0] for d, o in run_dirs.items()})
    return sweep_dir


def study_point(cfg: DictConfig, overrides: list[str], run_dir: Path, num_points: int) -> list[str]:
    """Keep a halving study's point for ddt.study (its overrides and config_id); the problems of the study's settings."""
    from omegaconf import OmegaConf

    from ddt.config import config_id, validate

    halving = OmegaConf.to_container(cfg.halving, resolve=False)
    target = str(cfg.hydra.launcher.get("_target_", ""))
    detached = "ddt_detached_launcher" in target
    if not target.endswith("BasicLauncher") and not detached:
        return [f"+halving=on runs on the basic launcher (one command here) or detached on SLURM "
                f"(+cluster=localhost_detached, hydra/launcher=submitit_slurm_detached); hydra.launcher is {target}, "
                f"which would wait on this machine for every rung (docs/halving.md)"]
    if num_points > MAX_CHECKED_POINTS:
        return [f"a halving study of {num_points} points: at most {MAX_CHECKED_POINTS}; split it into studies"]
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "train.max_steps"]
    try:
        rungs = [int(r) for r in OmegaConf.to_container(cfg.halving, resolve=True)["rungs"]]
        plain = validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])).to_dict()
    except Exception:  # the values are at fault: run_problems names them
        return []
    if given and given[-1] != str(rungs[-1]):
        return [f"train.max_steps={given[-1]} with halving.rungs={halving['rungs']}: a study trains each point to "
                f"each rung in turn, the last the full length; leave train.max_steps out"]
    STUDY.setdefault("points", []).append({"name": run_dir.name, "overrides": list(overrides),
                                           "config_id": config_id(plain), "seed": plain.get("seed")})
    STUDY.update(study_dir=run_dir.parent, rungs=rungs, eta=int(cfg.halving.eta), metric=str(cfg.halving.metric),
                 detached=detached)
    return []


def record_study():
    """Write (or check) the halving study's record, halving/study.json, with this command for its decision jobs."""
    from ddt.study import Point, record_study as record

    try:
        return record(STUDY["study_dir"], STUDY["rungs"], STUDY["eta"], STUDY["metric"],
                      [Point(**p) for p in STUDY["points"]], command=sys.argv[1:], cwd=os.getcwd())
    except UsageError as err:
        fail("\nlaunch.py: error: ".join(err.problems))


def sweep_summary(sweep_dir: Path) -> None:
    """The status of every point of the sweep (ddt.status's table), then the report command."""
    from ddt.status import sweep_status, table

    print(table(sweep_status(sweep_dir)), file=sys.stderr)
    print(f"report: python -m analysis.report {sweep_dir}", file=sys.stderr)


# The groups `prepare` loads files from: a sweep checks those files once per distinct set of them.
PREPARED_GROUPS = ("data", "resolution", "eval", "repa", "cache_dir", "stage")


def run_problems(cfg: DictConfig, overrides: list[str], run_dir: Path, multirun: bool, prepared: set,
                 here: bool) -> list[str]:
    """The problems of one composed run (values, cross-key rules, device where the run runs `here`, files), one
    line each; a single run's check is kept for the runner, which then does not repeat it."""
    from omegaconf import OmegaConf, open_dict

    from ddt.runner import CHECKED, check_run

    with open_dict(cfg):
        del cfg["hydra"]  # the launcher's settings are Hydra's to check
    files_key = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in PREPARED_GROUPS if k in cfg]))
    try:
        checked = check_run(cfg, run_dir, prepare_parts=not multirun or files_key not in prepared, here=here)
    except UsageError as err:
        if not multirun:
            return err.problems
        where = ",".join(o for o in overrides if not o.startswith("hydra.")) or "default"
        return [f"sweep point {where}: {problem}" for problem in err.problems]
    prepared.add(files_key)
    if not multirun:
        CHECKED[run_dir.resolve()] = (OmegaConf.to_yaml(cfg), checked)
    return []


def renamed_run_problems(run_dir: Path, overrides: list[str]) -> list[str]:
    """A run made under the earlier run-folder rule (which named train.max_steps, +cluster, ...): say what to rename."""
    from ddt.config import old_run_subdir

    old = run_dir.with_name(old_run_subdir(overrides))
    if old == run_dir or run_dir.exists() or not (old / "results.json").exists():
        return []
    return [f"{old} was made under the earlier run-folder rule; the same experiment's folder is now {run_dir} "
            f"(docs/running.md, What names a run): to continue it, mv '{old}' '{run_dir}'; to start afresh, "
            f"move it out of {old.parent}"]


def shared_folder_problems(run_dirs: dict[Path, list[list[str]]]) -> list[str]:
    """Sweep points that would write one run folder (they differ only in keys that do not name a run)."""
    return [f"sweep points {' and '.join(','.join(o) or 'default' for o in overrides[:2])} would share the run folder "
            f"{run_dir}: they differ only in keys that do not define the experiment (docs/running.md, What names a "
            f"run); run them one after the other, or give each its own name=" for run_dir, overrides in run_dirs.items()
            if len(overrides) > 1]


def check_output_dir(path: Path, key: str) -> None:
    """The run folder (or a parent of it) must not be a file."""
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            fail(f"{key}={path}: {folder} is a file, not a folder; move it away or choose another {key}")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    """Run one configured job in Hydra's output directory."""
    hydra_cfg = HydraConfig.get()
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        return run(cfg, hydra_cfg.runtime.output_dir, sweep_dir=sweep_dir)
    except UsageError as err:
        if os.environ.get("SUBMITIT_EXECUTOR") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a SLURM job reports its failure to the launcher (results.json has the message)
        for problem in err.problems:  # console (stderr) and launch.log
            log.error("%s", problem)
        exit_codes.append(2)
        return None  # the other points of a sweep go on
    except Interrupted as err:
        sys.exit(err.exit_code)  # the runner logged where it stopped and how to resume


def _terminate(signum, frame):
    raise Interrupted(signum)


if __name__ == "__main__":
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # submitit's job handlers own SIGTERM inside a job
        signal.signal(signal.SIGTERM, _terminate)
    sweep = preflight(sys.argv[1:])
    study = record_study() if STUDY else None
    if study is not None and not STUDY["detached"]:  # the basic launcher: ddt.study trains the rungs as single runs
        from ddt.study import run_study

        try:
            code = run_study(study)
        except Interrupted as err:  # SIGTERM to the study: the point running gets it from its process group too
            code = err.exit_code
        except KeyboardInterrupt:
            code = 130
        if code in (0, 1):  # through, or stopped at a failed point or a blocked decision: where it stands
            sweep_summary(sweep)
        sys.exit(code)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a run (while Hydra composes or launches)
        sys.exit(130)
    from hydra_plugins.ddt_detached_launcher.launcher import SUBMITTED

    if sweep is not None and sweep.is_dir() and not SUBMITTED:  # a detached launch printed what it submitted
        sweep_summary(sweep)
    sys.exit(max(exit_codes, default=0))
