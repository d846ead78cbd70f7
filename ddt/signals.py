"""Signals during training: Ctrl-C and SIGTERM stop after the step with last.pt saved, a second one at once;
inside a submitit job, its preemption signal saves after the step, then requeues (the requeued job resumes at
that step).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
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
    """Ctrl-C or SIGTERM during training: say so at once, finish the step, save last.pt, then stop (Interrupted).

    A second signal stops at once (Interrupted, a KeyboardInterrupt, raised in the main thread); last.pt is
    only ever replaced by a rename, so it stays the last good checkpoint. Inside a submitit job its own
    handlers stay in charge.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    state = {"received": 0, "stopping": False, "raised": False}

    def stop(signum, frame):
        if state["received"] >= 2 and not state["raised"]:  # the second signal (counted by `answer`)
            state["raised"] = True
            raise Interrupted(signum, f"again: stopped at once at step {trainer.step}")
        if not state["stopping"]:
            state["stopping"] = True

            def raise_interrupted():
                raise Interrupted(signum, f"at step {trainer.step}")
            trainer.interrupt = raise_interrupted

    # Python runs signal handlers only between bytecodes of the main thread, which a long torch call (a
    # slow backward) holds for many seconds; the C-level handler also writes each signal's number to a
    # wakeup socket, where a thread reads it at once: it answers the user and counts the signals.
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    answerer = threading.Thread(target=_answer, args=(reader, trainer, state), name="ddt-interrupt", daemon=True)
    for sig in signals:
        signal.signal(sig, stop)
    wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    answerer.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(wakeup)
        writer.close()  # the answering thread reads the end of the stream and returns
        answerer.join(timeout=5)
        reader.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _answer(reader: socket.socket, trainer: Trainer, state: dict) -> None:
    """Say at the first Ctrl-C or SIGTERM that the run stops after this step; make the second stop it now."""
    while data := reader.recv(64):
        for signum in data:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            state["received"] += 1
            if state["received"] == 1:
                log.warning("%s at step %d: stopping after this step; Ctrl-C again to stop now",
                            signal.Signals(signum).name, trainer.step)
            elif state["received"] == 2 and not state["raised"]:
                # `stop` may have seen this signal before it was counted here, or not at all (Python merges a
                # signal still pending): signal the main thread once more (also ends a sleep or a wait)
                signal.pthread_kill(threading.main_thread().ident, signum)
