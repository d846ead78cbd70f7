"""A submitit SLURM launcher that returns once the sweep is submitted (hydra#2479, #3058: the blocking
launcher's watcher dies with the SSH session that started it).

Every `hydra.launcher.*` key of `submitit_slurm` works unchanged: this is hydra-submitit-launcher's
SlurmLauncher, whose executor hands back the submitted jobs instead of waiting for their results. Before
submitting, each point's run folder is read (ddt.status): a point that is pending or running, or completed
for the current settings, is not submitted again; every other point (not started, failed, cancelled,
interrupted, or completed with other settings, e.g. a raised train.max_steps) is, as one SLURM array.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import open_dict

log = logging.getLogger(__name__)
SUBMITTED: list[dict] = []  # what the last launch submitted (launch.py prints no end-of-sweep summary then)


class DetachedSlurmLauncher(SlurmLauncher):
    """SlurmLauncher that submits only the points that need it and does not wait for them."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        plan = [(list(o), *self._point(o)) for o in job_overrides]
        todo = [(o, run_dir, max_steps) for o, run_dir, max_steps, reason in plan if reason is None]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        for overrides, run_dir, _, reason in plan:
            if reason is not None:
                print(f"not submitted  {run_dir.name}: {reason}")
        jobs = []
        if todo:
            with _returning_jobs(jobs):
                super().launch([o for o, _, _ in todo], initial_job_idx)
            self._record(todo, jobs)
        SUBMITTED.append({"sweep_dir": str(sweep_dir), "jobs": [j.job_id for j in jobs]})
        array = jobs[0].job_id.split("_")[0] if jobs else None
        print(f"submitted {len(jobs)} of {len(plan)} point(s)" + (f" as SLURM array {array}" if array else "")
              + f"; nothing waits for them. Status: python -m ddt.status {sweep_dir}", flush=True)
        return [JobReturn(overrides=o, working_dir=str(d), task_name="launch", status=JobStatus.COMPLETED)
                for o, d, _ in todo]

    def _point(self, overrides: Sequence[str]) -> tuple[Path, int | None, str | None]:
        """(run folder, train.max_steps, why it is not submitted: None when it should be)."""
        from ddt.config import stages, validate
        from ddt.ledger import read_point
        from ddt.runner import is_completed
        from ddt.status import ACTIVE, point_status, slurm_states

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        with open_dict(cfg):
            del cfg["hydra"]
        plain = validate(cfg)  # launch.py checked every point already
        point = read_point(run_dir)
        jobs = {s["slurm_job_id"] for s in point["submissions"]} | set(point["ledger"].get("slurm_job_ids", []))
        row = point_status(point, slurm_states(jobs))
        if row["state"] in ACTIVE:
            return run_dir, plain["train"]["max_steps"], f"{row['state']} as SLURM job {','.join(row['slurm_job_ids'][-1:])}"
        if row["state"] == "completed" and is_completed(point["results"], plain, stages(cfg)):
            return run_dir, plain["train"]["max_steps"], "completed with these settings"
        return run_dir, plain["train"]["max_steps"], None

    def _record(self, todo: list, jobs: list) -> None:
        from ddt.ledger import record_submission

        for (overrides, run_dir, max_steps), job in zip(todo, jobs):
            record_submission(run_dir, job.job_id, overrides, max_steps=max_steps, log=str(job.paths.stderr))
            print(f"submitted      {run_dir.name}: SLURM job {job.job_id}, log {job.paths.stderr}")


@contextlib.contextmanager
def _returning_jobs(jobs: list):
    """While inside, submitit's executors return at once: map_array's jobs go to `jobs`, and the launcher's
    wait for their results (job.results()) returns a placeholder instead of blocking."""
    import submitit

    original = submitit.AutoExecutor

    class Executor(original):
        def map_array(self, fn, *iterable):
            submitted = super().map_array(fn, *iterable)
            jobs.extend(submitted)
            return [_Submitted() for _ in submitted]

    submitit.AutoExecutor = Executor
    try:
        yield
    finally:
        submitit.AutoExecutor = original


class _Submitted:
    def results(self) -> list[None]:
        return [None]
