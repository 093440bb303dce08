"""DataLoader worker processes: how they are started, and what a forked one must not inherit.

`worker_context` chooses fork or a fork server; `worker_init` guards inherited thread-exit hooks and
keeps a dead loader's broken handovers out of the log.

DataLoader workers are forked (Linux's default start method). A library with background threads
registers hooks with `threading._register_atexit` that stop and drain those threads when the
interpreter ends: Prefect does so for its log and event workers, so every process that has run a
flow or a task has them. A forked worker inherits the hooks but not the threads; at its exit the
hooks fail (Prefect's raise AssertionError), the worker's exit code becomes 1 however cleanly it
finished, and torch reports "DataLoader worker (pid ...) exited unexpectedly" when the iterator is
dropped early (an evaluation with a limit, a finished training run in a process that ran Prefect).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import sys
import threading
import time

log = logging.getLogger(__name__)


def _guarded(hook):
    @functools.wraps(hook)
    def call():
        try:
            hook()
        except Exception as e:  # the thread it was for lives only in the parent
            log.debug("an inherited thread-exit hook failed in a DataLoader worker: %r", e)
    return call


def worker_init(_worker_id: int, owner: int | None = None) -> None:
    """DataLoader worker_init_fn: inherited thread-exit hooks can no longer fail the worker's exit, and
    a handover that the loader's process (`owner`; the worker's parent when None) broke off by dying
    prints no traceback (quiet_once_owner_gone)."""
    hooks = getattr(threading, "_threading_atexits", None)  # CPython's list; absent elsewhere
    if isinstance(hooks, list):
        hooks[:] = [_guarded(h) for h in hooks]
    quiet_once_owner_gone(os.getppid() if owner is None else owner)


HANDOVER_GRACE_S = 2.0  # the owner's sockets close a moment before it is seen gone
_HANDOVER_ERRORS = (EOFError, OSError, multiprocessing.AuthenticationError)


def quiet_once_owner_gone(owner: int) -> None:
    """A worker hands each batch's tensors to the loader's process as file descriptors (torch's
    file_descriptor sharing, Linux's default), through multiprocessing's resource sharer: a thread in
    the worker that prints any failure with sys.excepthook. A rank killed outright (SIGKILL, the OOM
    killer) while fetching a batch broke such a handover off, and its worker's traceback reached the
    run's log under the dead rank's name (a clean-clone CI run, 2026-12-07), beside the launcher's one
    line on how the rank ended. Such a failure is dropped when `owner` is gone within HANDOVER_GRACE_S;
    any other, or with the owner alive, is printed as before."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, _HANDOVER_ERRORS) and _gone_within(owner, HANDOVER_GRACE_S):
            return  # a consequence of the owner's death, which is told where it is seen
        previous(kind, value, tb)

    sys.excepthook = hook


def _gone_within(pid: int, wait_s: float) -> bool:
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


class WorkerInit:
    """worker_init_fn for workers from a fork server: they get this process's environment as it is
    now (credentials, AWS_ENDPOINT_URL set by a command or a test after the server started), not
    the server's copy from its start. The working directory and sys.path come with multiprocessing's
    own preparation data. Their owner is this process, not their parent (the server)."""

    def __init__(self):
        self.env = dict(os.environ)
        self.owner = os.getpid()

    def __call__(self, worker_id: int) -> None:
        os.environ.clear()
        os.environ.update(self.env)
        worker_init(worker_id, self.owner)


def loader_kwargs(workers: int) -> dict:
    """DataLoader arguments that start `workers` worker processes safely from this process."""
    if not workers:
        return {"worker_init_fn": worker_init}
    ctx = worker_context()
    return {"multiprocessing_context": ctx, "worker_init_fn": worker_init if ctx is None else WorkerInit()}


# Imported once by the fork server, so that each worker it forks starts with them loaded.
_PRELOAD = ["torch", "torchvision.transforms", "PIL.Image", "webdataset", "open_clip", "cloob.evaluate.datasets"]


def worker_context():
    """The multiprocessing context for DataLoader workers: None (fork, the default) when this process
    runs no thread but the main one, else a fork server's.

    fork() copies only the calling thread: a lock that another thread holds at that moment (torch's
    generator mutex, taken by any random op; an allocator's; a logging handler's) stays locked in the
    child for ever, and the worker hangs at its first use of it: `torch.manual_seed` in
    `_worker_loop`, as seen in `cloob demo` with four evaluations in Prefect task threads. A fork
    server is a fresh single-threaded process, started once (fork+exec) and kept; workers are forked
    from it, so they inherit nothing held. It costs one interpreter start per process, not per worker.
    """
    if threading.active_count() == 1:
        return None
    import multiprocessing
    import multiprocessing.forkserver

    ctx = multiprocessing.get_context("forkserver")
    # Only read when the server starts (the first forkserver worker of this process); later calls no-op.
    multiprocessing.forkserver.set_forkserver_preload(_PRELOAD)
    return ctx
