"""Tie a process's life to its parent's: on Linux, ask the kernel to signal us when the parent dies.

torchrun starts each rank in a session of its own, so a signal to torchrun's process group does
not reach the ranks, and if torchrun is killed outright (SIGKILL, the OOM killer, its own launcher
killed) the ranks would go on training as orphans, writing into a run directory that a rerun is
about to resume. `cloob.train` and `cloob.run.torchrun` call `die_with_parent` first thing; `cloob
train` calls `die_with_wrapper` (a SIGKILL of `uv run` ends it too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> bool:
    """Have `sig` delivered to this process when its parent exits. Returns False where the platform
    has no such thing (not Linux). If the parent is already gone (we were reparented before the
    request took effect), exit at once: the request would never fire."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if expected_parent is None else expected_parent
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except OSError:
        return False
    # The kernel only signals on a death after the request; one before it shows as a new parent.
    if os.getppid() != parent:
        os._exit(128 + int(sig))
    return True


# Parents that only wrap the command they run: a SIGKILL of one of them must not leave it running.
WRAPPERS = ("uv",)


def die_with_wrapper(sig: int = signal.SIGTERM) -> bool:
    """die_with_parent(sig) when the parent process is a wrapper such as `uv run`; True if so.

    Not for any parent: `nohup cloob train ... &` or a tmux pane must outlive the shell that started
    them. `uv run` forwards SIGINT and SIGTERM to its child, but when it is killed outright (SIGKILL,
    the OOM killer) its child would go on as an orphan."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/comm") as f:
            name = f.read().strip()
    except OSError:
        return False
    return name in WRAPPERS and die_with_parent(sig, parent)
