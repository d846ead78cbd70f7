"""Signals during training: Ctrl-C and SIGTERM stop after the step with last.pt saved; inside a submitit
job, its preemption signal saves after the step, then requeues (the requeued job resumes at that step).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from ddt.errors import Interrupted
from ddt.train import Trainer

log = logging.getLogger("ddt.runner")


def preemption_signal() -> signal.Signals | None:
    """The signal submitit's job handler requeues on (USR2 unless SUBMITIT_PREEMPT_SIGNAL says); None outside."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    return submitit.JobEnvironment._usr_sig()


@contextlib.contextmanager
def checkpoint_on_preemption(trainer: Trainer):
    """In a submitit job, turn its preemption signal into: finish the step, save, then requeue.

    submitit's own handler requeues at once, losing the steps since the last checkpoint; here the
    trainer calls it after saving, so the requeued job resumes from the very step it was stopped at.
    """
    sig = preemption_signal()
    requeue = signal.getsignal(sig) if sig is not None else None
    if not callable(requeue) or threading.current_thread() is not threading.main_thread():
        yield  # not in a submitit job (or no handler of its to defer)
        return

    def defer(signum, frame):
        log.warning("caught %s at step %d: saving a checkpoint after this step, then requeueing",
                    signal.Signals(signum).name, trainer.step)
        trainer.interrupt = lambda: requeue(signum, frame)

    signal.signal(sig, defer)
    try:
        yield
    finally:
        signal.signal(sig, requeue)


@contextlib.contextmanager
def stop_after_step_on_interrupt(trainer: Trainer):
    """Ctrl-C or SIGTERM during training: finish the step, save last.pt, then stop (Interrupted).

    A second Ctrl-C stops at once. Inside a submitit job its own handlers stay in charge.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum, frame):
        for sig, handler in previous.items():
            signal.signal(sig, handler)

        def raise_interrupted():
            raise Interrupted(signum, f"at step {trainer.step}")
        trainer.interrupt = raise_interrupted

    for sig in previous:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
