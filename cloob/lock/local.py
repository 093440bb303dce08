"""The lock of a local folder: lock.json replaced by atomic rename under a flock() on the folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time

from cloob.errors import CloobError
from cloob.lock.holder import _dump, _parse

GUARD_WAIT_S = 30.0  # the guarded step takes milliseconds; waiting longer means something is stuck


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
