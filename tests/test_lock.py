"""The folder lock (cloob.lock) with real processes: a second writer is refused naming the holder, a
stale lock (dead process, expired lease) is taken over, of many contenders exactly one wins (a free
lock or a stale one; local and S3 through moto's server), and `cloob train` on a run folder in use
is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import child_env

from cloob.errors import CloobError
from cloob.lock import folder_lock

# A holder: waits for `go` (if given), takes the lock, says so, holds it until `release` exists.
HOLDER = r"""
import os, signal, sys, time
# Ctrl-C as a terminal delivers it, however pytest was started: a shell's background job (`cmd &`
# without job control) starts with SIGINT ignored, and Python then installs no KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
from cloob.errors import CloobError
from cloob.lock import folder_lock
folder, release, lease, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
print("ready", flush=True)
while go != "-" and not os.path.exists(go):
    time.sleep(0.002)
try:
    with folder_lock(folder, purpose="test holder", lease_s=lease):
        print("acquired", flush=True)
        while not os.path.exists(release):
            time.sleep(0.01)
except CloobError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
"""


def _env() -> dict:
    return child_env()


def _start(folder: str, release: Path, lease: float = 3600, go: Path | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, folder, str(release), str(lease), str(go or "-")],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _acquired(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline().strip()
    assert line == "acquired", (line, proc.stderr.read() if proc.poll() is not None else "")


def _try_once(folder: str, lease: float = 3600) -> subprocess.CompletedProcess:
    """Another process that takes the lock and gives it back at once (release given beforehand)."""
    return subprocess.run([sys.executable, "-c", HOLDER, folder, os.devnull, str(lease), "-"], env=_env(),
                          capture_output=True, text=True, timeout=120)


def _wait(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "a" / "b"
    release = tmp_path / "release"
    holder = _start(str(folder), release)
    _acquired(holder)
    lock = json.loads((folder / "lock.json").read_text())
    assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname()

    second = _try_once(str(folder))
    assert second.returncode == 2, second.stderr
    err = second.stderr
    assert f"pid {holder.pid}" in err and f"host {socket.gethostname()}" in err and "since 20" in err
    assert "fix:" in err and f"kill {holder.pid}" in err
    assert err.count("error:") == 1 and "Traceback" not in err

    release.touch()
    assert holder.wait(timeout=60) == 0
    # Released, and the folders the lock made for itself are gone again (nothing was written there).
    assert not (tmp_path / "a").exists()
    assert _try_once(str(folder)).returncode == 0


def test_the_lock_of_a_killed_holder_is_taken_over_at_once(tmp_path):
    folder = tmp_path / "run"
    holder = _start(str(folder), tmp_path / "never")
    _acquired(holder)
    holder.kill()  # not reaped yet: a zombie counts as gone too
    _wait(lambda: psutil.Process(holder.pid).status() == psutil.STATUS_ZOMBIE, "the zombie")
    assert (folder / "lock.json").exists()
    t0 = time.monotonic()
    taker = _try_once(str(folder))  # its lease (3600 s) has not run out: the dead pid decides
    assert taker.returncode == 0, taker.stderr
    assert "took over the lock" in taker.stderr and "its process has ended" in taker.stderr
    assert time.monotonic() - t0 < 60
    holder.wait()
    assert not (folder / "lock.json").exists()  # released by the taker
    # A pid that now belongs to another process (another start time) is not the holder either.
    stale = _start(str(folder), tmp_path / "never")
    _acquired(stale)
    stale.kill()
    stale.wait()
    rec = json.loads((folder / "lock.json").read_text())
    rec["pid"] = os.getpid()  # alive, but started at another time than the record says
    (folder / "lock.json").write_text(json.dumps(rec))
    taker = _try_once(str(folder))
    assert taker.returncode == 0 and "pid now belongs to another process" in taker.stderr, taker.stderr


def test_a_live_holder_is_not_taken_over_even_when_it_stopped_renewing(tmp_path):
    folder = tmp_path / "run"
    release = tmp_path / "release"
    holder = _start(str(folder), release, lease=0.5)
    _acquired(holder)
    os.kill(holder.pid, signal.SIGSTOP)  # no more heartbeats, but the process lives
    try:
        _wait(lambda: time.time() - (folder / "lock.json").stat().st_mtime > 2, "the lease to run out")
        second = _try_once(str(folder))
        assert second.returncode == 2 and f"pid {holder.pid}" in second.stderr, second.stderr
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    release.touch()
    assert holder.wait(timeout=60) == 0


def test_a_holder_elsewhere_is_taken_over_once_its_lease_ran_out(tmp_path):
    folder = tmp_path / "run"
    holder = _start(str(folder), tmp_path / "never")
    _acquired(holder)
    holder.kill()
    holder.wait()
    rec = json.loads((folder / "lock.json").read_text())
    rec.update(host="another-host", lease_s=3)  # a holder on another machine sharing this folder (NFS)
    (folder / "lock.json").write_text(json.dumps(rec))
    refused = _try_once(str(folder))
    assert refused.returncode == 2 and "host another-host" in refused.stderr and "last renewed" in refused.stderr
    _wait(lambda: time.time() - (folder / "lock.json").stat().st_mtime > 3.5, "the lease to run out")
    taker = _try_once(str(folder))
    assert taker.returncode == 0 and "was not renewed" in taker.stderr, taker.stderr


def test_the_lock_is_released_on_an_error_and_on_ctrl_c(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(CloobError, match="boom"):
        with folder_lock(str(folder), purpose="test"):
            (folder / "output.txt").write_text("kept")
            raise CloobError("boom")
    assert not (folder / "lock.json").exists() and (folder / "output.txt").read_text() == "kept"

    holder = _start(str(folder), tmp_path / "never")
    _acquired(holder)
    holder.send_signal(signal.SIGINT)  # KeyboardInterrupt inside the with block
    holder.wait(timeout=60)
    assert not (folder / "lock.json").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["output.txt"]


def _race(url: str, tmp_path: Path, n: int = 4) -> None:
    """n processes go for the lock at the same moment: exactly one gets it, the others are refused
    naming the winner."""
    go, release = tmp_path / "go", tmp_path / "release"
    go.unlink(missing_ok=True)
    release.unlink(missing_ok=True)
    procs = [_start(url, release, go=go) for _ in range(n)]
    go.touch()
    try:
        _wait(lambda: sum(p.poll() is not None for p in procs) >= n - 1, "the losers to be refused", 120)
        time.sleep(0.5)  # the winner holds on: a second winner would have had time to say so
        alive = [p for p in procs if p.poll() is None]
        assert len(alive) == 1, [(p.returncode, p.stderr.read()) for p in procs if p.poll() is not None]
        winner = alive[0]
        _acquired(winner)
        for p in procs:
            if p is not winner:
                err = p.stderr.read()
                assert p.returncode == 2 and f"pid {winner.pid}" in err, err
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=60)
    assert winner.returncode == 0


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_many_contenders_one_wins_locally(tmp_path, stale):
    folder = tmp_path / "run"
    for _ in range(3):
        if stale:  # a lock left by a killed holder: all contenders find it stale at once
            holder = _start(str(folder), tmp_path / "never")
            _acquired(holder)
            holder.kill()
            holder.wait()
        _race(str(folder), tmp_path)


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_many_contenders_one_wins_on_s3(tmp_path, s3, stale):
    s3.mkdir(f"lock-race-{int(stale)}")
    url = f"s3://lock-race-{int(stale)}/runs/r"
    for _ in range(2):
        if stale:
            holder = _start(url, tmp_path / "never")
            _acquired(holder)
            holder.kill()
            holder.wait()
            assert s3.exists(f"{url}/lock.json")
        _race(url, tmp_path)
    s3.invalidate_cache()
    assert not s3.exists(f"{url}/lock.json")


def test_s3_lease_is_renewed_and_an_expired_one_taken_over(tmp_path, s3):
    s3.mkdir("lock-lease")
    url = "s3://lock-lease/runs/r"
    release = tmp_path / "release"
    holder = _start(url, release, lease=2)
    _acquired(holder)
    # The holder's heartbeat renews the lease (every lease/4): Last-Modified moves on.
    seen = set()

    def renewed_twice():
        s3.invalidate_cache()
        seen.add(s3.info(f"{url}/lock.json")["LastModified"])
        return len(seen) >= 3

    _wait(renewed_twice, "two renewals")
    release.touch()
    assert holder.wait(timeout=60) == 0
    s3.invalidate_cache()
    assert not s3.exists(f"{url}/lock.json")

    # A lock of a holder on another machine is stale once not renewed for its lease, by the
    # server's clock.
    # Its lease is long enough for the refused contender to start on a loaded machine (a 2 s lease
    # expired before it had, in a clean-clone run of 2026-12-07), and it is waited out before trying again.
    lease = 10
    holder = _start(url, tmp_path / "never", lease=lease)
    _acquired(holder)
    holder.kill()
    holder.wait()
    rec = json.loads(s3.cat(f"{url}/lock.json"))
    rec.update(host="another-host")
    s3.pipe(f"{url}/lock.json", json.dumps(rec).encode())
    written = time.monotonic()
    refused = _try_once(url)
    assert refused.returncode == 2 and "host another-host" in refused.stderr, refused.stderr
    time.sleep(max(0.0, written + lease - time.monotonic()))
    deadline = time.monotonic() + 60
    while (taker := _try_once(url)).returncode != 0:
        assert time.monotonic() < deadline, taker.stderr
        time.sleep(0.2)
    assert "was not renewed" in taker.stderr


def _holder_pid(lock: Path, proc: subprocess.Popen) -> int:
    """The pid in a lock taken by `proc` or by a process it started (a launcher runs the trainer as
    its child)."""
    pid = json.loads(lock.read_text())["pid"]
    assert pid == proc.pid or pid in {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    return pid


@pytest.mark.slow
def test_two_trainings_on_one_run_folder_only_one_trains(tmp_path, shards_dir):
    """Fault report 5a/5b: two `cloob train` with one train.run_name and different seeds both
    trained and both printed done; the second is now refused, naming the first."""
    def cmd(seed):
        return [sys.executable, "-m", "cloob.cli", "train", "tiny", f"data.train={shards_dir}",
                f"train.output={tmp_path}", "train.run_name=exp", f"train.seed={seed}", "train.batch_size=8",
                "train.steps=200", "train.checkpoint_every=1000", "train.log_every=1", "data.workers=1",
                "train.progress=false"]

    env = dict(_env(), OMP_NUM_THREADS="1")
    run_dir = tmp_path / "runs" / "exp"
    first = subprocess.Popen(cmd(0), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()
              or first.poll() is not None, "the first run's first step", 300)
        assert first.poll() is None, first.stderr.read()
        lock = run_dir / "lock.json"
        holder = _holder_pid(lock, first) if lock.exists() else None  # (None: no lock at all)
        second = subprocess.run(cmd(1), env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"pid {holder}" in second.stderr and "is in use" in second.stderr and "fix:" in second.stderr
        assert "train.run_name" in second.stderr and "Traceback" not in second.stderr
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert "done: 200 steps" in err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 201))  # every metric line of the one run that trained, once
    assert not (run_dir / "lock.json").exists()
    from cloob.config import load_recipe
    from cloob.train.checkpoint import CheckpointStore

    meta = json.loads((Path(CheckpointStore(str(run_dir)).latest().url) / "meta.json").read_text())
    assert meta["recipe_hash"] == load_recipe("tiny", cmd(0)[5:]).content_hash()
