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

Modules: holder.py (the record and when it is stale), local.py and s3.py (the two backends),
folder.py (FolderLock and folder_lock, the API).
"""

from cloob.lock.folder import FolderLock, LockHeld, folder_lock  # noqa: F401 (the API)
from cloob.lock.holder import DEFAULT_LEASE_S, LOCK_NAME, lease_s_default  # noqa: F401
