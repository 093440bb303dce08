"""FolderLock: take, renew (a heartbeat thread) and release the lock of one folder, on either backend."""

from __future__ import annotations

import errno
import logging
import posixpath
import socket
import sys
import threading

import fsspec

from cloob.errors import CloobError
from cloob.lock.holder import DEFAULT_LEASE_S, LOCK_NAME, _ago, _record, _stale, lease_s_default
from cloob.lock.local import _FolderGone, _Local
from cloob.lock.s3 import _S3
from cloob.storage import is_local, protocol_of

log = logging.getLogger("cloob.lock")


class LockHeld(CloobError):
    """The lock is held by a live holder (`holder`: its record). A caller that would rather wait
    than be refused catches this one (cloob.evaluate.claim)."""

    def __init__(self, problem: str, fix: str | None = None, holder: dict | None = None):
        super().__init__(problem, fix)
        self.holder = holder or {}


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
        proto = protocol_of(fs)
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
            from cloob.storage_errors import is_storage_error

            if is_storage_error(e) or e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # a store down, or a full disk: the command names its store and the cause (cloob.cli)
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

    def check_free(self) -> None:
        """Raise the CloobError that acquire() would raise if a live holder has the lock now; change
        nothing. A look before starting work that would be refused later (the launcher, before
        torchrun starts the rank that takes the lock). A failure to look is not an error here."""
        if self._b is None:
            return
        try:
            got = self._b.read()
        except OSError:
            return
        if got is not None and _stale(got[0], got[1]) is None:
            raise self._held(got[0], got[1])

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

    def _held(self, held: dict, age_s: float) -> LockHeld:
        here = held.get("host") == socket.gethostname()
        renewed = "" if here else f", last renewed {_ago(age_s)} ago"
        since = held.get("since", "?").replace("T", " ").replace("+00:00", " UTC")
        stop = f"stop it (kill {held.get('pid')}{'' if here else ' on ' + str(held.get('host'))})"
        return LockHeld(
            f"{self.label} is in use: {held.get('purpose', 'another cloob command')} (host {held.get('host')}, "
            f"pid {held.get('pid')}, since {since}{renewed}) holds its lock {self.url}",
            f"wait for it to finish or {stop}, then rerun{'; or ' + self.alternative if self.alternative else ''}. "
            f"Once that process is gone the lock is taken over by itself: at once by a run on {held.get('host')}, "
            f"by one elsewhere {float(held.get('lease_s', DEFAULT_LEASE_S)):g} s after its last renewal", held)

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
