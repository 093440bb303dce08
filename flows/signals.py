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
_state: dict = {"exit_process": False, "fired": 0}


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
    started and raise in the main thread. With exit_process (a command: `cloob demo`), the process is
    gone within about `grace_s` seconds whatever its threads do, with exit status 128 + the signal.
    Elsewhere than in the main thread it does nothing.

    Blocks nest: a flow body's block goes over the handler that Prefect's flow engine installs when
    the run starts (its SIGTERM bridge, which reports the run cancelled or crashed) and passes the
    signal on to it; the command's block around the flow decides the exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_exit = _state["exit_process"]
    _state["exit_process"] = outer_exit or exit_process
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig, frame):
        if _state["fired"]:  # a second signal: no more waiting
            _signal_all(_descendants(), signal.SIGKILL)
            os._exit(128 + sig)
        _state["fired"] = sig
        print(f"\n{what}: {signal.Signals(sig).name} received, stopping; finished work is kept, run the same "
              "command again to resume", file=sys.stderr, flush=True)
        # The Prefect server goes last: the run's final state is reported through it.
        _signal_all([p for p in _descendants() if not _is_prefect_server(p)], signal.SIGTERM)
        threading.Thread(target=_hard_exit, args=(sig, grace_s, _state["exit_process"]), name="cloob-stop",
                         daemon=True).start()
        before = previous[sig]
        if callable(before) and before is not signal.default_int_handler and not getattr(before, "_cloob", False):
            before(sig, frame)  # Prefect's bridge raises its TerminationSignal here
        raise KeyboardInterrupt if sig == signal.SIGINT else SystemExit(128 + sig)

    handler._cloob = True
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    except BaseException:
        if exit_process and _state["fired"]:  # whatever the flow made of the signal, the command ends so
            raise SystemExit(128 + _state["fired"]) from None
        raise
    finally:
        _state["exit_process"] = outer_exit
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
