"""A submitit SLURM launcher that returns once the sweep is submitted (hydra#2479, #3058: the blocking
launcher's watcher dies with the SSH session that started it).

Every `hydra.launcher.*` key of `submitit_slurm` works unchanged: this is hydra-submitit-launcher's
SlurmLauncher, whose executor hands back the submitted jobs instead of waiting for their results. Before
submitting, each point's run folder is read (ddt.status): a point that is pending or running, or completed
for the current settings, is not submitted again; every other point (not started, failed, cancelled,
interrupted, or completed with other settings, e.g. a raised train.max_steps) is, as one SLURM array.

A halving study (+halving=on, ddt.study) is submitted one rung at a time: the open rung's points that need it
as one array (train.max_steps=RUNG, extension in place), and a small decision job with an `afterany`
dependency on them that runs the study's command again. That run decides the rung (ddt.study.decide, written
once) and submits the next rung the same way; no process waits on the login node. A decision job submits
only points never submitted for the rung: a failed or cancelled point blocks the decision until the user
runs the command again (which resubmits it) or drops it (python -m ddt.study drop).
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import open_dict

log = logging.getLogger(__name__)
SUBMITTED: list[dict] = []  # what the last launch submitted (launch.py prints no end-of-sweep summary then)
FOLLOW = "DDT_STUDY_DECISION_JOB"  # set (to its SLURM job id) in the study command a decision job runs again
DECISION_JOBS = "decision_jobs.json"  # STUDY_DIR/halving/: {rung: [decision job ids]}


class DetachedSlurmLauncher(SlurmLauncher):
    """SlurmLauncher that submits only the points that need it and does not wait for them."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if self.config.get("halving") is not None:
            return self._launch_study(initial_job_idx)
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

    def _launch_study(self, initial_job_idx: int) -> Sequence[JobReturn]:
        """Decide the rungs whose points are through, then submit the open rung's points and its decision job."""
        from ddt.ledger import read_point
        from ddt.study import decide, read_study, reached, running
        from ddt.status import ACTIVE, point_status, slurm_states

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        study, follow = read_study(sweep_dir), os.environ.get(FOLLOW)
        returns, submitted = [], []
        while True:
            rung = study.open_rung()
            points = running(study, rung)
            records = {p.name: read_point(study.run_dir(p)) for p in points}
            jobs = {j for r in records.values() for j in [*(s["slurm_job_id"] for s in r["submissions"]),
                                                          *r["ledger"].get("slurm_job_ids", [])]}
            slurm = slurm_states(jobs)  # one sacct call for the rung's points
            rows = {name: point_status(r, slurm) for name, r in records.items()}
            active = [rows[p.name]["slurm_job_ids"][-1] for p in points
                      if rows[p.name]["state"] in ACTIVE and rows[p.name]["slurm_job_ids"]]
            todo = [p for p in points if not reached(records[p.name]["results"], rung)
                    and rows[p.name]["state"] not in ACTIVE
                    and not (follow and any(s.get("max_steps") == rung for s in records[p.name]["submissions"]))]
            new = []
            if todo:  # the points as the study's runs: its overrides less the halving keys, at the rung's length
                from ddt.study import passed_overrides

                plan = [([*passed_overrides(p.overrides), f"train.max_steps={rung}"], study.run_dir(p), rung)
                        for p in todo]
                with _returning_jobs(new):
                    super().launch([o for o, _, _ in plan], initial_job_idx)
                self._record(plan, new)
                returns += [JobReturn(overrides=o, working_dir=str(d), task_name="launch", status=JobStatus.COMPLETED)
                            for o, d, _ in plan]
                submitted += [j.job_id for j in new]
            array = f" as SLURM array {new[0].job_id.split('_')[0]}" if new else ""
            print(f"rung {rung}: submitted {len(new)} of {len(points)} point(s){array}", flush=True)
            waiting = [*active, *(j.job_id for j in new)]
            if rung == study.rungs[-1] or waiting:
                if rung != study.rungs[-1]:
                    self._decision_job(sweep_dir, rung, waiting, fresh=bool(new), own=follow)
                break
            decision = decide(sweep_dir, rung, {n: r["state"] for n, r in rows.items()})
            if decision.status != "decided":
                for b in decision.blocked:
                    print(f"rung {rung}: decision blocked by {b['run']} ({b['reason']}); run the same command again to "
                          f"resubmit it, or python -m ddt.study drop {sweep_dir} {b['run']}", flush=True)
                break
            print(f"rung {rung}: decided ({sweep_dir / 'halving' / f'rung_{rung}.json'}): kept "
                  f"{len(decision.kept)}, pruned {len(decision.pruned)}", flush=True)
            study = read_study(sweep_dir)
        SUBMITTED.append({"sweep_dir": str(sweep_dir), "jobs": submitted})
        print(f"nothing waits on this machine. Status: python -m ddt.status {sweep_dir}", flush=True)
        return returns

    def _decision_job(self, sweep_dir: Path, rung: int, after: list[str], fresh: bool, own: str | None) -> None:
        """Submit the job that runs the study's command again once `after` have ended (afterany), unless one
        is already waiting for this rung and nothing new was submitted."""
        import submitit

        from ddt.files import atomic_write_json
        from ddt.ledger import read_json
        from ddt.status import SLURM_RUNNING, SLURM_WAITING, slurm_states

        path = sweep_dir / "halving" / DECISION_JOBS
        known = read_json(path)
        mine = [j for j in known.get(str(rung), []) if j != own]
        states = slurm_states(set(mine)) or {}
        waiting = [j for j in mine if states.get(j) in (*SLURM_WAITING, *SLURM_RUNNING)]
        if waiting and not fresh:
            print(f"rung {rung}: decision job {waiting[-1]} is waiting for it", flush=True)
            return
        if own and not fresh:  # a decision job follows only what it submitted: never a chain of decision jobs
            print(f"rung {rung}: points {', '.join(after)} still pending or running; the command that submitted them "
                  f"submitted their decision job", flush=True)
            return
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        # the points' partition, account, memory...: one CPU, no GPU, for a few minutes
        params = {k: v for k, v in self.params.items() if k not in (
            "submitit_folder", "max_num_timeout", "array_parallelism", "gpus_per_node", "gpus_per_task",
            "cpus_per_gpu", "mem_per_gpu", "gres", "setup", "srun_args")}
        params.update(cpus_per_task=1, tasks_per_node=1, nodes=1, timeout_min=30, name=f"{params.get('name')}_decide",
                      additional_parameters=dict(params.get("additional_parameters") or {},
                                                 dependency="afterany:" + ":".join(after)))
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor = submitit.AutoExecutor(folder=self.params["submitit_folder"], cluster="slurm")
        executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
        job = executor.submit(run_study_command, str(sweep_dir))
        atomic_write_json({**known, str(rung): [*known.get(str(rung), []), job.job_id]}, path)
        print(f"rung {rung}: decision job {job.job_id} runs the study's command again once its points have ended "
              f"(afterany:{','.join(after)}); log {job.paths.stdout}", flush=True)

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


def run_study_command(study_dir: str) -> int:
    """A decision job: run the study's command again where it was given (it decides the rung, submits the next),
    outside this job's SLURM environment (the jobs it submits are their own)."""
    from ddt.study import LAUNCH, read_study

    study = read_study(study_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SUBMITIT_"))}
    env[FOLLOW] = os.environ.get("SLURM_JOB_ID", "")
    code = subprocess.run([sys.executable, str(LAUNCH), *study.command], cwd=study.cwd, env=env).returncode
    if code:
        raise RuntimeError(f"the study's command ended with exit status {code} (this job's log has its lines)")
    return code
