"""SIGTERM to `cloob prepare`: stop the download, leave nothing running, say so in one line.

SIGTERM (a batch system, Kubernetes, `kill`) used to end `cloob prepare` at once and silently. Its
img2dataset process then died of its parent-death signal (SIGKILL), so under the ray distributor
the local Ray it had started was never shut down: Ray's agents (`ray::DashboardAgent`,
`ray::RuntimeEnvAgent`, ~200 MB) lived on for about a minute. Now the signal is raised in the main
thread as Stopped; the round in flight passes SIGTERM on to the fetch process (under ray, Ray's own
handler there shuts its local cluster down; under multiprocessing the pool workers follow their
parent, cloob.prepare.download.fetch), waits up to STOP_GRACE_S for it, and then kills whatever of
that round is still alive: its process tree as it was at the signal, and every process carrying the
round's CLOOB_FETCH_TOKEN in its environment (Ray's workers, reparented or not; its agents do not
inherit the environment, but are in the tree). A second SIGTERM does not wait. The folder's
lock is released on the way out, and finished shards are kept: a rerun resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid

import psutil

STOP_GRACE_S = 30.0  # Ray's graceful shutdown takes a few seconds; a busy machine more
TOKEN_VAR = "CLOOB_FETCH_TOKEN"
_hurry = threading.Event()  # set by a second signal while stopping


class Stopped(BaseException):
    """A stop signal came: raised in the main thread, past every `except Exception`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_sigterm():
    """Within this block (in the main thread), SIGTERM raises Stopped once; a second one hurries the
    clean-up (stop_fetch) instead of raising again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, _frame):
        if fired:
            _hurry.set()
            return
        fired.append(signum)
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    _hurry.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def new_token() -> str:
    """A mark for one round's processes (several preparations may run in one process: a flow)."""
    return uuid.uuid4().hex


def stop_fetch(proc: subprocess.Popen, token: str, stopped: bool) -> None:
    """End the fetch process `proc` and everything it started. stopped: on our SIGTERM, pass it on
    and give it STOP_GRACE_S to shut down; else (Ctrl-C, which reached it too, or an error) 10 s."""
    try:  # Ray's agents do not inherit the token, but are in this tree while Ray runs
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    if stopped and proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + (STOP_GRACE_S if stopped else 10.0)
    while proc.poll() is None and time.monotonic() < deadline and not _hurry.is_set():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    proc.kill()
    proc.wait()
    kill_marked(token, tree)


def kill_marked(token: str, tree: list[psutil.Process] = ()) -> None:
    """SIGKILL the processes of `tree` still alive and every process of this user whose environment
    carries `token` (TOKEN_VAR)."""
    marked = [p for p in tree if p.is_running()] + marked_by(token)
    for p in marked:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(marked, timeout=5)


def marked_by(token: str) -> list[psutil.Process]:
    """The processes of this user, other than this one, whose environment carries `token` (TOKEN_VAR)."""
    me = os.getpid()
    marked = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(TOKEN_VAR) == token:
                marked.append(p)
        except (psutil.Error, OSError):
            continue  # gone, or another user's
    return marked
