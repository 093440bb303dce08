"""SIGTERM and SIGINT end a flow process (the demo, a pipeline run in a terminal or under a worker),
whatever its threads are doing.

A flow's tasks run in threads that Python cannot interrupt: a task blocked in a read, a DataLoader or
a subprocess keeps the interpreter alive at exit (it joins its threads), so a signal that only
raises in the main thread can leave the process running for ever, holding its torchrun and
img2dataset children. On the first signal this stops every child process tree (SIGTERM, which
torchrun passes to its ranks), hands the signal on to the handler that was there before (Prefect's,
which reports the run as cancelled/crashed), and arms a timer: if the process has not exited
`grace_s` later, the rest of the tree gets SIGKILL and the process exits with 128 + the signal.
Every finished artefact is already on disk (atomic writes), so a rerun resumes where this stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import psutil

GRACE_S = 20.0
_active = False


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _is_prefect_server(p: psutil.Process) -> bool:
    try:
        return any("uvicorn" in part for part in p.cmdline()[:3])
    except psutil.Error:
        return False


def _hard_exit(sig: int, grace_s: float, exit_process: bool) -> None:
    """After grace_s: SIGKILL what is left and exit, if this is a command's process or if the
    interpreter is already exiting (the main thread has finished and waits for stuck task threads).
    Inside a long-lived process (a notebook) the stuck threads are left alone until it exits."""
    _, alive = psutil.wait_procs(_descendants(), timeout=grace_s)
    while not exit_process and threading.main_thread().is_alive():
        threading.Event().wait(1.0)
    _signal_all(_descendants(), signal.SIGKILL)
    sys.stderr.flush()
    os._exit(128 + sig)


@contextlib.contextmanager
def stop_on_signals(what: str, grace_s: float = GRACE_S, exit_process: bool = False):
    """Within this block (entered in the main thread), SIGTERM and SIGINT stop every process this one
    started and raise in the main thread; with exit_process (a command), the process is gone within
    about `grace_s` seconds whatever its threads do. Elsewhere than in the main thread it does nothing."""
    global _active
    if _active or threading.current_thread() is not threading.main_thread():
        yield  # an outer block (the demo around its pipeline) already stops the process
        return
    _active = True
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    fired = threading.Event()

    def handler(sig, frame):
        if fired.is_set():  # a second signal: no more waiting
            _signal_all(_descendants(), signal.SIGKILL)
            os._exit(128 + sig)
        fired.set()
        name = signal.Signals(sig).name
        print(f"\n{what}: {name} received, stopping; finished work is kept, run the same command again "
              "to resume", file=sys.stderr, flush=True)
        # The Prefect server goes last: the run's final state is reported through it.
        _signal_all([p for p in _descendants() if not _is_prefect_server(p)], signal.SIGTERM)
        threading.Thread(target=_hard_exit, args=(sig, grace_s, exit_process), name="cloob-stop",
                         daemon=True).start()
        before = previous[sig]
        if callable(before) and before not in (signal.default_int_handler,):
            before(sig, frame)
        raise KeyboardInterrupt if sig == signal.SIGINT else SystemExit(128 + sig)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        _active = False
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
