"""The one owner of a run folder: run_dir/owner.json names the process that may write there.

A run takes its folder before it writes anything (`hold`) and beats a heartbeat into owner.json while it
works, so a second command aimed at the folder (a duplicate launch, a refused one, `stage=evaluate` of a
run still training) stops before any write with one line naming the live owner (`live_owner`). An owner
that is gone is taken over with a line saying so:
- on the same host, its pid no longer runs (kill -9), or the pid now belongs to another process;
- on another host, no heartbeat for STALE_AFTER_S (a lost node); a requeued SLURM job is its own owner.

Torch-free, like ddt.files: launch.py checks owners of every sweep point before Hydra writes a file.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from ddt.errors import UsageError
from ddt.files import atomic_write_json
from ddt.ledger import now, read_json, slurm_job_id

OWNER = "owner.json"
HEARTBEAT_S = 30  # how often a live owner rewrites its heartbeat
STALE_AFTER_S = 300  # an owner on another host is taken for gone after this long without a heartbeat
log = logging.getLogger(__name__)


def process_start(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat), so a reused pid is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in (...) may hold spaces


def this_process() -> dict:
    """What owner.json says of this process: host, pid (with its start), SLURM job, command."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "slurm_job_id": slurm_job_id(), "command": " ".join(sys.argv)[:300]}


def is_mine(owner: dict) -> bool:
    """Whether owner.json names this process, or an earlier attempt of this SLURM job (a requeue)."""
    me = this_process()
    if owner.get("slurm_job_id") and owner.get("slurm_job_id") == me["slurm_job_id"]:
        return True
    return owner.get("host") == me["host"] and owner.get("pid") == me["pid"]


def gone_because(owner: dict, clock: float | None = None) -> str | None:
    """Why the owner named in owner.json no longer runs, or None while it is alive."""
    if owner.get("host") == socket.gethostname() and owner.get("pid"):
        pid = int(owner["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"its process {pid} on {owner['host']} is gone"
        except PermissionError:  # another user's process: alive
            pass
        start = process_start(pid)
        if owner.get("pid_start") and start and start != owner["pid_start"]:
            return f"its process {pid} on {owner['host']} is gone (the pid now belongs to another process)"
        return None
    age = (clock or time.time()) - float(owner.get("heartbeat_unix", 0))
    if age > STALE_AFTER_S:
        return f"no heartbeat from {owner.get('host')} for {age / 60:.0f} min (more than {STALE_AFTER_S // 60} min)"
    return None


def describe(owner: dict) -> str:
    """The owner in a few words: process, host, SLURM job, heartbeat age."""
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    age = time.time() - float(owner.get("heartbeat_unix", 0))
    return (f"process {owner.get('pid')} on {owner.get('host')}{job}, since {owner.get('started')}, "
            f"last heartbeat {age:.0f} s ago")


def read_owner(path: Path) -> dict:
    """owner.json ({} when missing or unreadable: a folder whose owner cannot be named has none)."""
    try:
        return read_json(path)
    except (ValueError, OSError) as err:
        log.warning("%s is unreadable (%s): the folder is taken as unowned", path, err)
        return {}


def live_owner(run_dir: str | Path) -> dict | None:
    """owner.json of run_dir when it names another process that is still alive, else None."""
    owner = read_owner(Path(run_dir) / OWNER)
    if not owner or is_mine(owner) or gone_because(owner):
        return None
    return owner


def held_problem(run_dir: str | Path, owner: dict) -> str:
    """The one line a command aimed at a live run's folder stops with."""
    return (f"{run_dir} belongs to a live run ({describe(owner)}): nothing was written; wait for it to end "
            f"(python -m ddt.status {Path(run_dir).parent}), or stop it and run this command again")


class Hold:
    """This process's ownership of a run folder: taken at start, a heartbeat while working, given up at the end."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / OWNER
        self.stop = threading.Event()
        self.record: dict = {}
        self.thread: threading.Thread | None = None

    def take(self) -> "Hold":
        """Take the folder (UsageError naming the owner when a live run holds it); say so when taking over."""
        self.record = {**this_process(), "started": now()}
        owner = read_owner(self.path)
        if owner and not is_mine(owner):
            why = gone_because(owner)
            if why is None:
                raise UsageError(held_problem(self.path.parent, owner))
            log.warning("%s: taking over the run folder from %s: %s", self.path.parent, describe(owner), why)
        if not owner and not self._claim():  # another process created owner.json between the read and now
            raise UsageError(held_problem(self.path.parent, read_owner(self.path)))
        self._beat()
        self.thread = threading.Thread(target=self._beat_until_stopped, name="ddt-heartbeat", daemon=True)
        self.thread.start()
        return self

    def _claim(self) -> bool:
        """Create owner.json only if no one else did (a hard link fails on an existing name, NFS included)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{OWNER}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self._beat_record(), f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _beat_record(self) -> dict:
        return {**self.record, "heartbeat": now(), "heartbeat_unix": round(time.time(), 1)}

    def _beat(self) -> None:
        atomic_write_json(self._beat_record(), self.path)

    def _beat_until_stopped(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except OSError as err:  # a full or vanished disk must not kill the run; status sees the old beat
                log.warning("could not write the heartbeat to %s: %s", self.path, err)

    def give_up(self) -> None:
        """End the heartbeat and remove owner.json if it still names this process."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if is_mine(read_owner(self.path)):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Hold":
        return self.take()

    def __exit__(self, *exc) -> None:
        self.give_up()
