"""One writer per folder: the lock that `cloob prepare` holds on a dataset folder and `cloob train`
(its main rank) on a run folder, on a local disk or on S3.

A lock is one small JSON file or object, `<folder>/lock.json`, naming its holder (host, pid and the
process's start time, since when, what for) and a token of its own. A second writer finds it and is
refused with a CloobError that names the holder. A stale lock is taken over by the next writer:
- its holder ran on this machine and its process is gone: the pid is dead, a zombie, or now another
  process (a reused pid has another start time), or the machine has rebooted since. Judged at once,
  so a rerun after a crash or a kill -9 goes on without waiting. A live holder on this machine is
  never taken over, however long since it renewed (a stopped process is still alive).
- its holder ran elsewhere (another host, or a container with its own pid namespace) and its lease
  ran out: the holder renews the lock every lease/4 seconds from a heartbeat thread, and a lock not
  renewed for `lease_s` (CLOOB_LOCK_LEASE_S, default 120) is stale.

Local folders: the lock is created and replaced by atomic rename, under a flock() on the folder
itself, so that "read the lock, judge it, replace it" is one step among processes: of two that
find the same stale lock only one takes it. The kernel drops a flock when its process dies, so the
guard can never be left behind. Renewal touches the file's mtime, which is the lease's clock.
(Where a filesystem has no flock on folders, e.g. NFS, a POSIX lock on `lock.json.guard` is used.)
S3: created with a conditional PUT (If-None-Match: *), so of two creators one wins; renewed by a PUT
conditional on the holder's own ETag; a lease's age is the object's Last-Modified against the Date
of the server's reply, so no two machines' clocks are compared; a stale lock is replaced by a PUT
conditional on the stale ETag (of two takers one wins); released by a DELETE conditional on our
ETag. This needs a store with conditional writes (AWS S3 and moto have them).

The lock is released when its `with` block ends, by an exception (CloobError, KeyboardInterrupt)
too. Folders the lock had to create are removed again if they are still empty then, so a run that
fails before writing anything leaves nothing behind. No torch, no prefect here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import posixpath
import socket
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import fsspec
import psutil

from cloob.errors import CloobError
from cloob.storage import is_local

log = logging.getLogger("cloob.lock")

LOCK_NAME = "lock.json"
DEFAULT_LEASE_S = 120.0
GUARD_WAIT_S = 30.0  # the guarded step takes milliseconds; waiting longer means something is stuck


def lease_s_default() -> float:
    return float(os.environ.get("CLOOB_LOCK_LEASE_S", DEFAULT_LEASE_S))


# ------------------------------------------------------------------------------- who holds it

def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _record(purpose: str, lease_s: float) -> dict:
    return {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time(), "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"), "lease_s": lease_s,
            "token": uuid.uuid4().hex}


def _gone(rec: dict) -> str | None:
    """Why the holder is certainly gone, if that can be told from here; else None (alive, or a
    process this machine cannot see)."""
    if rec.get("host") != socket.gethostname():
        return None
    if rec.get("boot_id") and _boot_id() and rec["boot_id"] != _boot_id():
        return "this machine has restarted since"
    if rec.get("pid_namespace", "") != _pid_namespace():
        return None  # another container on this host: its pid means nothing here
    try:
        p = psutil.Process(int(rec["pid"]))
        if p.status() == psutil.STATUS_ZOMBIE:
            return "its process has ended"
        if abs(p.create_time() - float(rec["started"])) > 0.5:
            return "its process has ended (its pid now belongs to another process)"
        return None
    except psutil.NoSuchProcess:
        return "its process has ended"
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None  # cannot tell (access denied, an odd record): treat it as alive


def _stale(rec: dict, age_s: float) -> str | None:
    """Why this lock may be taken over, or None if its holder may still be at work."""
    why = _gone(rec)
    if why:
        return why
    if rec.get("host") == socket.gethostname() and rec.get("pid_namespace", "") == _pid_namespace():
        return None  # a live process of this machine: its lease does not matter
    lease = float(rec.get("lease_s", DEFAULT_LEASE_S))
    if age_s > lease:
        return f"it was not renewed for {age_s:.0f} s (its lease is {lease:g} s)"
    return None


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


# ------------------------------------------------------------------------------------ backends

class _FolderGone(Exception):
    """The local folder was removed (by a releasing holder's clean-up) while we looked: look again."""


class _Local:
    """lock.json in a local folder; the check-and-replace step under a flock on the folder."""

    def __init__(self, folder: str, name: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, name)
        self.created: list[str] = []  # folders made for the lock, parents first

    def prepare(self) -> None:
        missing, d = [], self.folder
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d)
                self.created.append(d)

    @contextlib.contextmanager
    def guard(self):
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise _FolderGone() from None
        try:
            try:
                _wait_for(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), self.folder)
            except OSError as e:
                if e.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                os.close(fd)  # no flock on folders here (NFS): a POSIX lock on a guard file instead
                fd = os.open(self.path + ".guard", os.O_RDWR | os.O_CREAT, 0o644)
                _wait_for(lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), self.folder)
            else:
                # The folder may have been removed (and made again) between open and flock by a
                # releasing holder's clean-up: a lock on the old folder guards nothing.
                st, now = os.fstat(fd), os.stat(self.folder)
                if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                    raise _FolderGone()
            try:
                yield
            except FileNotFoundError:  # the folder went while we wrote into it
                raise _FolderGone() from None
        except FileNotFoundError:
            raise _FolderGone() from None
        finally:
            os.close(fd)  # closing drops the flock / POSIX lock

    def read(self) -> tuple[dict, float, None] | None:
        try:
            with open(self.path, "rb") as f:
                data, mtime = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _parse(data, self.path), time.time() - mtime, None

    def write(self, rec: dict, etag=None) -> bool:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix="-lock.json")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(_dump(rec))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True

    def renew(self, rec: dict) -> bool:
        got = self.read()
        if got is None or got[0].get("token") != rec["token"]:
            return False
        os.utime(self.path)
        return True

    def remove(self, rec: dict) -> None:
        with self.guard():
            got = self.read()
            if got is not None and got[0].get("token") == rec["token"]:
                os.unlink(self.path)

    def cleanup(self) -> None:
        for d in reversed(self.created):
            try:
                os.rmdir(d)  # only if empty: whatever the run wrote stays
            except OSError:
                break

    def uri(self) -> str:
        return self.path


def _wait_for(try_lock, folder: str) -> None:
    deadline = time.monotonic() + GUARD_WAIT_S
    while True:
        try:
            try_lock()
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # how flock and lockf say "busy"
                raise
            if time.monotonic() > deadline:
                raise CloobError(f"another process has been checking the lock of {folder} for over "
                                 f"{GUARD_WAIT_S:g} s", "look for a stopped (Ctrl-Z) cloob process, end it, "
                                 "then rerun") from None
            time.sleep(0.01)


class _S3:
    """lock.json as an S3 object: conditional PUTs and DELETE keep every change one-winner."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)
        self.created: list[str] = []

    def prepare(self) -> None:
        pass

    @contextlib.contextmanager
    def guard(self):
        yield  # every step below is a single conditional request

    def _run(self, coro_fn):
        from fsspec.asyn import sync

        return sync(self.fs.loop, coro_fn)

    def _call(self, method: str, **kw):
        return self._run(lambda: self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kw))

    def read(self) -> tuple[dict, float, str] | None:
        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return resp, data

        try:
            resp, data = self._run(get)
        except FileNotFoundError:
            return None
        # The lease's age by the server's clock alone: its Date now against the object's Last-Modified.
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        return _parse(data, self.uri()), (now - resp["LastModified"]).total_seconds(), resp["ETag"]

    def write(self, rec: dict, etag: str | None = None) -> str | None:
        """Create (etag None: only if absent) or replace (only if still `etag`); the new ETag, or
        None where another process got there first."""
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            return self._call("put_object", Body=_dump(rec), ContentType="application/json", **cond)["ETag"]
        except (OSError, ValueError) as e:
            code, status = _s3_error(e)
            # Lost a race: the condition failed, a concurrent conditional write, or (IfMatch) the
            # object was deleted meanwhile. A missing bucket (NoSuchBucket, also 404) is an error.
            if code in _LOST_RACE or (code is None and status in (409, 412)):
                return None
            raise

    def renew(self, rec: dict) -> bool:
        # A new body each time, so each renewal changes the ETag: a taker that read the lock
        # before this renewal then fails its conditional PUT.
        rec["renewals"] = rec.get("renewals", 0) + 1
        etag = self.write(rec, self.etag)
        if etag is None:
            return False
        self.etag = etag
        return True

    def remove(self, rec: dict) -> None:
        try:
            self._call("delete_object", IfMatch=self.etag)
        except (OSError, ValueError) as e:
            code, status = _s3_error(e)
            if code in _LOST_RACE or (code is None and status == 412):
                return  # no longer ours (taken over after our lease ran out) or already gone
            if status not in (400, 501):
                raise
            got = self.read()  # a store without conditional deletes: check, then delete
            if got is not None and got[0].get("token") == rec["token"]:
                self.fs.rm_file(self.path)

    def cleanup(self) -> None:
        pass

    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.path)


_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")


def _s3_error(e: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind an s3fs exception (it keeps botocore's as the cause)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            return resp.get("Error", {}).get("Code"), resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        e = e.__cause__ or e.__context__
    return None, None


def _dump(rec: dict) -> bytes:
    return json.dumps(rec, indent=1, sort_keys=True).encode()


def _parse(data: bytes, where: str) -> dict:
    try:
        rec = json.loads(data)
    except ValueError:
        rec = None
    if not isinstance(rec, dict) or "token" not in rec:
        raise CloobError(f"{where} is not a lock that cloob can read",
                         "if no cloob command is using that folder, delete the file and rerun")
    return rec


# ------------------------------------------------------------------------------------ the lock

class FolderLock:
    """The exclusive lock on one folder (a local path or an s3:// URL); use as a context manager."""

    def __init__(self, folder: str, *, purpose: str, alternative: str | None = None, name: str = LOCK_NAME,
                 lease_s: float | None = None, label: str | None = None):
        self.folder = folder
        self.label = label or folder  # what the messages call the locked thing
        self.purpose = purpose
        self.alternative = alternative
        self.lease_s = float(lease_s if lease_s is not None else lease_s_default())
        fs, path = fsspec.core.url_to_fs(folder)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if is_local(fs):
            self._b = _Local(path, name)
        elif proto in ("s3", "s3a"):
            self._b = _S3(fs, posixpath.join(path.rstrip("/"), name))
        else:  # no conditional writes known for it: go on unlocked rather than refuse to work
            log.warning("no lock on %s: locks work on local folders and s3:// only", folder)
            self._b = None
        self.record: dict | None = None
        self.lost = False  # set by the heartbeat when another process has taken the lock over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self._b.uri() if self._b else self.folder

    def acquire(self) -> FolderLock:
        if self._b is None:
            return self
        rec = _record(self.purpose, self.lease_s)
        try:
            self._b.prepare()
            for _ in range(5):
                try:
                    if self._try(rec):
                        break
                except _FolderGone:
                    self._b.prepare()
            else:
                raise CloobError(f"could not take the lock {self.url}: it kept changing",
                                 "rerun the command")
        except OSError as e:
            self._b.cleanup()
            raise CloobError(f"cannot write the lock {self.url}: {type(e).__name__}: {e}",
                             "check that the folder is writable (for a bucket: that it exists, and the "
                             "credentials)") from None
        except BaseException:  # refused (CloobError), or Ctrl-C while trying
            self._b.cleanup()
            raise
        self.record = rec
        self._thread = threading.Thread(target=self._heartbeat, name="cloob-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _try(self, rec: dict) -> bool:
        """One attempt; True once the lock is ours. Raises the "held" CloobError."""
        with self._b.guard():
            got = self._b.read()
            if got is None:
                etag = self._b.write(rec)
            else:
                held, age, etag = got
                if held.get("token") == rec["token"]:  # our own create, retried by the client
                    self._b.etag = etag
                    return True
                why = _stale(held, age)
                if why is None:
                    raise self._held(held, age)
                etag = self._b.write(rec, etag)
                if etag:
                    log.warning("took over the lock %s from %s (pid %s on %s, since %s): %s", self.url,
                                held.get("purpose", "?"), held.get("pid"), held.get("host"), held.get("since"), why)
            if etag:
                self._b.etag = etag if isinstance(etag, str) else None
                return True
        return False  # another process changed it first: look again

    def _held(self, held: dict, age_s: float) -> CloobError:
        here = held.get("host") == socket.gethostname()
        renewed = "" if here else f", last renewed {_ago(age_s)} ago"
        since = held.get("since", "?").replace("T", " ").replace("+00:00", " UTC")
        stop = f"stop it (kill {held.get('pid')}{'' if here else ' on ' + str(held.get('host'))})"
        return CloobError(
            f"{self.label} is in use: {held.get('purpose', 'another cloob command')} (host {held.get('host')}, "
            f"pid {held.get('pid')}, since {since}{renewed}) holds its lock {self.url}",
            f"wait for it to finish or {stop}, then rerun{'; or ' + self.alternative if self.alternative else ''}. "
            f"Once that process is gone the lock is taken over by itself: at once by a run on {held.get('host')}, "
            f"by one elsewhere {float(held.get('lease_s', DEFAULT_LEASE_S)):g} s after its last renewal")

    def _heartbeat(self) -> None:
        every = max(self.lease_s / 4, 0.05)
        while not self._stop.wait(every):
            try:
                if not self._b.renew(self.record):
                    self.lost = True
                    print(f"warning: the lock {self.url} was removed, or taken over by another process after "
                          f"this one did not renew it within its {self.lease_s:g} s lease; two writers may now "
                          f"share {self.label}", file=sys.stderr)
                    return
            except Exception:  # noqa: BLE001 (a failed renewal is retried; the lease allows for some)
                continue

    def release(self) -> None:
        if self.record is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if not self.lost:
                self._b.remove(self.record)
        except (OSError, CloobError) as e:
            log.warning("could not remove the lock %s: %s (the next run takes it over once stale)", self.url, e)
        finally:
            self.record = None
            self._b.cleanup()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def folder_lock(folder: str, *, purpose: str, alternative: str | None = None, name: str = LOCK_NAME,
                lease_s: float | None = None, label: str | None = None) -> FolderLock:
    """The lock `<folder>/<name>`, taken on entering a `with` block; see the module's docstring.
    `purpose` says who holds it ("cloob train"), `alternative` is offered in the refusal's fix, and
    `label` names the locked thing in messages (default: the folder)."""
    return FolderLock(folder, purpose=purpose, alternative=alternative, name=name, lease_s=lease_s, label=label)
