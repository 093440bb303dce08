"""Preemption: SIGTERM ends training at the next step boundary, with a checkpoint of that step.

SIGTERM is how a run is asked to go away: Kubernetes deleting a pod (a spot reclaim, a drained node,
a cancelled job), a batch system, torchrun passing its own SIGTERM on to every rank, cloob.run.launch
stopping a run (a deadline, a cancel, SIGTERM or Ctrl-C to `cloob train`).

While the loop runs, the handler only records the signal. At the end of every step the ranks agree
on it (one all_reduce(MAX), cloob.train.boundary), so all of them stop after the same step, however
far apart their signals came; the main rank writes that step's checkpoint, and every rank leaves
with Preempted and exit status 128 + 15 = 143. A rerun resumes from that checkpoint, bit-exact.

Before the loop (rendezvous, loading, the first batch) and after it there is nothing to save, and
SIGTERM ends the process at once: as SystemExit(143), which leaves the blocks it is in, so that the
run folder's lock is released and the folders it made for it removed (torchrun stops a rank so when
its peer fails on bad data while this one still reads its first batch: killed outright, it left a
run folder holding only lock.json). A second SIGTERM meanwhile kills it as usual.

The time from the signal to the checkpoint is one step plus one save. Whoever sends SIGKILL after a
grace period must give that much: torchrun's agent waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for
its ranks (30 by default; cloob.run.launch sets it to train.stop_grace_s), the launcher waits a little
longer for torchrun, and a Kubernetes pod's terminationGracePeriodSeconds (deploy/k8s) longer still.

DataLoader workers: torchrun signals each rank's whole process group, and flows.signals every
process of its tree, so the rank's data workers get the same SIGTERM. A worker killed by it makes
torch raise in the rank, at any point of the step being finished (torch's SIGCHLD handler) or at the
next batch. So while the loop runs, a worker leaves SIGTERM to its rank, which shuts it down when it
stops (a worker whose rank dies ends by itself: torch's worker loop watches its parent). Before and
after the loop a worker dies of SIGTERM as usual: torch's own shutdown ends a stuck worker that way.
The flag that says "the loop runs" is one byte of memory shared with the forked workers.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import posixpath
import signal
import threading

from cloob.data.workers import worker_init as _plain_worker_init

_RUNNING = mmap.mmap(-1, 1)  # anonymous and shared: forked data workers see the rank's value
_state = {"signal": 0}


class Preempted(BaseException):
    """The ranks stopped after `step` because of `signum`; `checkpoint` is the URL written for it.

    A BaseException, as SystemExit is: no `except Exception` on the way out may take it for an error."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    def message(self) -> str:
        return message(self.signum, self.step, self.checkpoint)


def message(signum: int, step: int, checkpoint: str | None) -> str:
    """The one line that tells a user the run was preempted and how to go on."""
    how = "preempted" if signum == signal.SIGTERM else "stopped"
    written = f"checkpoint {posixpath.basename(checkpoint.rstrip('/'))} written" if checkpoint else "no checkpoint"
    return (f"cloob train: {how} by {signal.Signals(signum).name} at step {step}; {written}; "
            "rerun the same command to resume")


@contextlib.contextmanager
def stop_at_step_boundary():
    """Within this block SIGTERM is recorded (see requested()) while the loop runs (between
    running() and stopped()); outside the loop it does what it did before. Main thread only;
    elsewhere signals cannot be handled and this does nothing."""
    _state["signal"] = 0  # nothing asked of this run yet (requested() keeps a previous run's answer)
    if threading.current_thread() is not threading.main_thread():
        try:
            yield
        finally:
            stopped()
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if _RUNNING[0]:
            _state["signal"] = _state["signal"] or signum
        else:
            _pass_on(previous, signum, frame)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:  # requested() keeps its answer: a failure after SIGTERM is told as a reaction (cloob.train.loop)
        stopped()
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def running() -> None:
    """The loop starts: from now on SIGTERM stops it at a step boundary."""
    _RUNNING[0] = 1


def stopped() -> None:
    """The loop is over: SIGTERM ends the process again (and its data workers)."""
    _RUNNING[0] = 0


def requested() -> int:
    """The signal that asked this process to stop (0: none); the ranks agree on it per step."""
    return _state["signal"]


def _pass_on(previous, signum: int, frame) -> None:
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # the default action, dying of it, after leaving the blocks we are in
        signal.signal(signum, signal.SIG_DFL)
        raise SystemExit(128 + signum)


def worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn of the training loader: cloob.data.workers' guard, and SIGTERM left
    to the rank while its loop runs (see the module docstring)."""
    _plain_worker_init(worker_id)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def _worker_sigterm(signum, frame) -> None:
    if _RUNNING[0]:
        return  # the rank stops at its step boundary and shuts this worker down then
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
