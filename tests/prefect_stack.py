"""A real Prefect server that a test can kill and start again (same port, same database), and process
workers that a test can kill: the parts of a deployment that fail in production (a server restart,
a lost node), as processes of this machine. Used by tests/test_deployment_faults.py, and by
conftest.py's `prefect_server` and `gpu_workers` fixtures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FAKE_SECRET = "fake-secret-d41d8cd98f00b204"  # deploy_env's S3 secret: must never leave the environment
GPU_TEST_POOL = "test-gpu-pool"  # conftest's gpu_workers; not cloob-*: test_deploy_server counts those


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """This process's environment without its Prefect settings, offline, and `flows` importable."""
    from conftest import child_env

    env = child_env({k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")})
    env.update(PREFECT_HOME=tempfile.mkdtemp(prefix="prefect-home-"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1")
    env.update(extra)
    return env


def deploy_env(**extra) -> dict:
    """clean_env for what `cloob deploy` and the deployments' workers run: with a fake S3 secret
    (FAKE_SECRET) that must not show up anywhere."""
    return clean_env(AWS_ACCESS_KEY_ID="fake-key-id", AWS_SECRET_ACCESS_KEY=FAKE_SECRET, **extra)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _db_template(home: Path) -> Path:
    """Where the first server of this test run leaves a copy of its freshly migrated database, for the
    next servers to start from: in pytest's folder of the run (pytest-N, shared by its pytest-xdist
    workers, removed with it), or beside `home` outside pytest."""
    import prefect

    run = next((d for d in home.parents if d.name.startswith("pytest-") and d.name[7:].isdigit()), home.parent)
    return run / f"prefect-{prefect.__version__}-migrated.db"


def _copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite database, also of one a server is writing (SQLite's backup API),
    put in place at once (another test process may be reading the template)."""
    import sqlite3

    part = dst.with_name(f"{dst.name}.{os.getpid()}.part")
    with sqlite3.connect(src) as a, sqlite3.connect(part) as b:
        a.backup(b)
    a.close()
    b.close()
    os.replace(part, dst)


class Server:
    """`prefect server start` on 127.0.0.1:port with its database in `home`. The event persister is on
    (the default): flow-run heartbeats are events, read back to tell a lost run. Services that would
    change runs behind a test's back (late runs, the scheduler, the foreman...) are off."""

    OFF = ("CANCELLATION_CLEANUP", "DB_VACUUM", "EVENT_LOGGER", "FOREMAN", "LATE_RUNS", "SCHEDULER",
           "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CLEANUP_RECONCILER", "TRIGGERS")

    def __init__(self, home: Path, off: tuple[str, ...] = OFF, **env):
        self.home, self.port = Path(home), free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.off, self.env = off, env

    def start(self, timeout: float = 120.0) -> str:
        # A new database starts as a copy of the first server's of this test run: migrated, its block
        # types registered (on a busy machine ~6 s of CPU and 10 s less before the server answers).
        template, db, copied = _db_template(self.home), self.home / "prefect.db", {}
        if not db.exists() and template.exists():
            _copy_db(template, db)
            copied = {"PREFECT_API_BLOCKS_REGISTER_ON_START": "false"}
        env = clean_env(PREFECT_HOME=str(self.home), **copied,
                        **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in self.off}, **self.env)
        self.starts += 1
        log = open(self.home / f"server-{self.starts}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--no-ui"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        if not template.exists():
                            _copy_db(db, template)
                        return self.url
            except OSError:
                time.sleep(0.25)
        raise AssertionError("the Prefect server did not start: " + self.log())

    def kill(self) -> None:
        """SIGKILL of the whole server (uvicorn runs in a child): the port refuses connections."""
        if self.proc is not None:
            _kill_group(self.proc, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` s. (5 s cut test_deployment_faults' teardown from 20 s to
        0.35 s, but its pytest process then hung at exit for over 6 minutes: the clients of the flows it ran
        in-process lost the server before they had sent everything. Kept at 20 s until that is drained.)"""
        if self.proc is not None:
            _kill_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            self.kill()

    def log(self) -> str:
        return (self.home / f"server-{self.starts}.log").read_text()[-3000:]


class Worker:
    """`prefect worker start --type process --limit 1` on `pool`, polling every 3 s, in a session
    of its own (so that a test can kill it and what it started, as a lost node loses both)."""

    def __init__(self, url: str, pool: str, name: str, folder: Path, limit: int | None = 1, **env):
        self.name, self.log_path = name, Path(folder) / f"{name}.log"
        wenv = clean_env(**{"PREFECT_API_URL": url, "OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "3", **env})
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                          "--type", "process", "--name", name,
                                          *(["--limit", str(limit)] if limit else [])], cwd=folder, env=wenv,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_online(self, client, pool: str, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while self.name not in {w.name for w in client.read_workers_for_work_pool(pool)}:
            assert self.proc.poll() is None and time.monotonic() < end, self.log()
            time.sleep(0.5)

    def flow_run_processes(self) -> list:
        """The processes that run this worker's flow runs (its children), not the worker itself."""
        import psutil

        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        _kill_group(self.proc, signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM, not waited for (stop() waits): stops several workers at once."""
        if self.proc.poll() is None:
            _kill_group(self.proc, signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return f"--- {self.name}\n" + self.log_path.read_text()[-3000:]
