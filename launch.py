"""Entry point: compose the Hydra config (conf/) and run its stages (ddt/runner.py).

    python launch.py                                   # the digits quickstart
    python launch.py -m model.encoder_depth=8,16,22    # a sweep, one run directory per value
    python launch.py stage=evaluate ckpt=PATH          # evaluate an existing checkpoint
    python launch.py stage=cache_latents resolution=r256 data.root=/imagenet/train   # SD-VAE latent cache
    python launch.py model=ddt_xl resolution=r256 repa=on data.root=/imagenet/train  # the paper's XL setting

A setting or file at fault stops the run before any work with one line per problem on stderr (also
in the run's launch.log and results.json) and exit status 2; no traceback unless HYDRA_FULL_ERROR=1.
Ctrl-C / SIGTERM save what they can and exit 130 / 143; the same command resumes.
"""
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ddt.config import register_resolvers
from ddt.errors import Interrupted, UsageError
from ddt.runner import run
from ddt.schema import all_keys, closest

CONF = Path(__file__).resolve().parent / "conf"
MAX_CHECKED_POINTS = 256  # sweep points whose composition is checked before the first job starts
log = logging.getLogger("launch")
exit_codes: list[int] = []
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
        problems, sweep_dir = [], None
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            for overrides in points[:MAX_CHECKED_POINTS]:
                cfg = compose("config", overrides=overrides, return_hydra_config=True)
                check_output_dir(Path(cfg.hydra.sweep.dir if args.multirun else cfg.hydra.run.dir),
                                 "hydra.sweep.dir" if args.multirun else "hydra.run.dir")
                if args.multirun:  # a single run validates in the runner, where its results.json records it
                    sweep_dir = Path(cfg.hydra.sweep.dir)
                    problems += point_problems(cfg, overrides)
    except Exception as err:  # composition: unknown key, unknown option, unparsable override
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail(composition_problem(err))
    if problems:  # no point starts while one of them is wrong
        fail("\n".join(dict.fromkeys(problems)) + f"\nlaunch.py: error: no sweep point was started "
                                                    f"({len(points)} points); fix the values above")
    return sweep_dir


def sweep_summary(sweep_dir: Path, since: float) -> None:
    """One line per point this launch ran (state, metrics, run folder), then the report command."""
    import json

    from ddt.runner import summary_line

    paths = [p for p in sorted(sweep_dir.rglob("results.json")) if p.stat().st_mtime >= since]
    print(f"sweep {sweep_dir}: {len(paths)} point(s)", file=sys.stderr)
    for path in paths:
        results = {"run_dir": str(path.parent), **json.loads(path.read_text())}
        error = f" | {str(results['error']).splitlines()[0]}" if results.get("error") else ""
        print(f"  {results.get('status', '?'):<11} {summary_line(results)}{error}", file=sys.stderr)
    print(f"report: python -m analysis.report {sweep_dir}", file=sys.stderr)


def point_problems(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The value problems (types, ranges, cross-key rules) of one composed sweep point, one line each."""
    from omegaconf import open_dict

    from ddt.config import validate

    with open_dict(cfg):
        del cfg["hydra"]  # the launcher's settings are Hydra's to check
    try:
        validate(cfg)
    except UsageError as err:
        where = ",".join(o for o in overrides if not o.startswith("hydra.")) or "default"
        return [f"sweep point {where}: {problem}" for problem in err.problems]
    return []


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
    started = time.time() - 1  # file times can be coarser than the clock
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a run (while Hydra composes or launches)
        sys.exit(130)
    if sweep is not None and sweep.is_dir():
        sweep_summary(sweep, started)
    sys.exit(max(exit_codes, default=0))
