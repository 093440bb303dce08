"""torchrun's process tree as the launcher sees it: remembered as it appears, stopped by pid.

torchrun starts each rank in a session of its own (torch's SubprocessHandler), so a signal to
torchrun's process group misses the ranks and their DataLoader workers, and a rank whose torchrun
died is reparented away from it. cloob.run.launch looks at the tree while the run goes and once
more before stopping it: SIGTERM to torchrun (which stops its ranks), then SIGKILL to whatever of
the tree is left after the grace period. psutil checks each process's start time, so a reused pid
is never signalled.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import psutil

log = logging.getLogger("cloob.run.launch")

_REAP_S = 30.0  # after SIGKILL: how long to wait for the group's processes to be reaped


def still_running(procs) -> list[psutil.Process]:
    """Those of `procs` that still run; a zombie is dead, whoever is to reap it (psutil checks the
    start time, so a reused pid does not count)."""
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


class ProcessTree:
    """torchrun and every process it starts, remembered as they appear.

    torchrun starts each rank in a session of its own (torch's SubprocessHandler), so a signal to
    torchrun's process group misses the ranks and their DataLoader workers, and a rank whose torchrun
    died is reparented away from it. So the tree is looked at while the run goes and once more
    before stopping it, and whatever was seen is stopped by pid (psutil checks the start time, so a
    reused pid is never signalled)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.known: dict[int, psutil.Process] = {}
        try:
            self.known[pid] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            pass

    def refresh(self) -> None:
        for proc in list(self.known.values()):
            try:
                for child in proc.children(recursive=True):
                    self.known.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def alive(self) -> list[psutil.Process]:
        return still_running(self.known.values())

    def signal_all(self, sig: int) -> None:
        """`sig` to torchrun's group, then to each live process and the group it leads (a rank's
        DataLoader workers are in the rank's group); never to our own group."""
        own = os.getpgrp()
        _signal_group(self.pid, sig)
        for proc in self.alive():
            try:
                pgid = os.getpgid(proc.pid)
                if pgid == proc.pid and pgid != own:
                    _signal_group(pgid, sig)
                else:
                    proc.send_signal(sig)
            except (psutil.Error, ProcessLookupError):
                pass

    def wait_gone(self, proc: subprocess.Popen, timeout: float) -> bool:
        """Wait until none of them runs; torchrun is reaped here, orphans by whoever adopted them."""
        end = time.monotonic() + timeout
        while True:
            proc.poll()
            self.refresh()  # a process started while stopping is stopped too
            if not self.alive() and not _group_alive(self.pid):
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal still exists
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_tree(proc: subprocess.Popen, tree: ProcessTree, grace_s: float) -> None:
    """SIGTERM torchrun (which stops its ranks itself), SIGKILL whatever of the tree is left after
    grace_s, and wait until all of it is gone."""
    tree.refresh()
    try:
        if tree.alive():
            # torchrun alone first: it forwards SIGTERM to the ranks and waits for them; a rank
            # signalled at the same time could die before torchrun notices and be reported failed.
            _signal_group(tree.pid, signal.SIGTERM)
            if tree.wait_gone(proc, grace_s):
                return
    finally:  # also when interrupted while waiting out the grace period
        if tree.alive() or _group_alive(tree.pid):
            tree.signal_all(signal.SIGKILL)
            if not tree.wait_gone(proc, _REAP_S):  # stuck in the kernel, or never reaped
                log.warning("processes of training run %d still exist %.0f s after SIGKILL: %s", tree.pid,
                            _REAP_S, [p.pid for p in tree.alive()])
        proc.poll()  # torchrun itself is reaped by now unless it is the one stuck
