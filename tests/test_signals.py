"""SIGTERM and SIGINT end a flow process and everything it started, even while its threads are stuck
(flows/signals.py): a process with a child process and a task thread that never returns."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import child_env

ROOT = Path(__file__).parents[1]

SCRIPT = r"""
import subprocess, sys, threading, time
from flows.signals import stop_on_signals

exit_process = sys.argv[1] == "command"
with stop_on_signals("test", grace_s=2, exit_process=exit_process):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    stuck = threading.Thread(target=threading.Event().wait)  # a task that never returns, not a daemon
    stuck.start()
    print(child.pid, flush=True)
    try:
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


@pytest.mark.parametrize("sig, kind", [(signal.SIGTERM, "command"), (signal.SIGINT, "command"),
                                       (signal.SIGTERM, "library"), (signal.SIGINT, "library")])
def test_a_signal_stops_the_process_and_its_children_despite_a_stuck_thread(sig, kind):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, kind], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        child = psutil.Process(int(proc.stdout.readline()))
        os.kill(proc.pid, sig)
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
        assert rc == 128 + sig, proc.stderr.read()
        assert took < 30, took  # grace 2 s; the stuck thread alone would keep it alive for ever
        psutil.wait_procs([child], timeout=10)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert f"{signal.Signals(sig).name} received, stopping" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
