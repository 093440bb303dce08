"""What a forked DataLoader worker must not inherit from its parent process.

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
import threading

log = logging.getLogger(__name__)


def _guarded(hook):
    @functools.wraps(hook)
    def call():
        try:
            hook()
        except Exception as e:  # the thread it was for lives only in the parent
            log.debug("an inherited thread-exit hook failed in a DataLoader worker: %r", e)
    return call


def worker_init(_worker_id: int) -> None:
    """DataLoader worker_init_fn: inherited thread-exit hooks can no longer fail the worker's exit."""
    hooks = getattr(threading, "_threading_atexits", None)  # CPython's list; absent elsewhere
    if isinstance(hooks, list):
        hooks[:] = [_guarded(h) for h in hooks]
