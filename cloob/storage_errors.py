"""A store that is down, slow, full or misaddressed, as one CloobError naming the store and the fix.

The storage clients (botocore, aiohttp, s3fs) raise their own types, wrapped in one another, with
tracebacks of 150 lines; a full local disk raises OSError(ENOSPC) from deep inside a write. None of
these is a bug of cloob. `cloob.cli.main` maps them here for every command (registry, results,
evaluate, prepare, import, ...); training maps the same errors in cloob.train.failures, with its own
words on resuming. No credentials are ever printed: a user:password@ in any URL is cut out.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Iterator

from cloob.errors import CloobError
from cloob.storage import redact

# Exception types of the storage clients, by module, so that none of them must be installed here.
STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "requests", "gcsfs", "adlfs")

AGAIN = "then run the same command again"
def one_line(text: object, limit: int = 400) -> str:
    """str(text) on one line, at most `limit` characters, credentials cut out."""
    text = redact(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """exc, then what it was raised from or during, and so on."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _of_storage_client(e: BaseException) -> bool:
    return any(c.__module__.split(".")[0] in STORAGE_MODULES for c in type(e).__mro__)


def is_storage_error(e: BaseException) -> bool:
    """An error of a storage client, or a lost connection or a timeout (for training, whose only
    connections are to its store and its peers)."""
    return _of_storage_client(e) or isinstance(e, (ConnectionError, TimeoutError))


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or (_of_storage_client(e) and "Timeout" in type(e).__name__)


def _is_unreachable(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, ConnectionError) or bool(names & {"EndpointConnectionError", "ClientConnectorError"})


def endpoint() -> str | None:
    """The S3 endpoint in use (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), credentials cut out."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return redact(url) if url else None


def _where(stores: Iterable[str], remote: bool, filename: str | None) -> str:
    """The store in words: the command's remote stores and the endpoint, or the local file."""
    stores = [redact(s) for s in stores if s]
    if remote:
        named = [s for s in stores if "://" in s and not s.startswith("file://")]
        ep = endpoint()
        text = ", ".join(dict.fromkeys(named)) or "the object store"
        return f"{text} (endpoint {ep})" if ep else text
    if filename:
        under = [s for s in stores if "://" not in s and os.path.abspath(filename).startswith(os.path.abspath(s))]
        return f"{under[0]} (writing {filename})" if under else str(filename)
    local = list(dict.fromkeys(s for s in stores if "://" not in s))
    full = [s for s in local if _is_full(s)]  # a write that failed for space names no file: which one is full?
    return ", ".join(full or local) or "the local disk"


def _is_full(folder: str) -> bool:
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def storage_failure(exc: BaseException, stores: Iterable[str] = ()) -> CloobError | None:
    """The CloobError that `exc` (or an error it came from) stands for, or None if it is no storage
    failure (a bug: it keeps its traceback). `stores`: the locations the command was given."""
    errors = list(chain(exc))
    # A storage client in the chain: the failure is the object store's. A bare timeout or lost
    # connection without one is some other service's (an HTTP download, Prefect's API): not mapped.
    remote = any(_of_storage_client(e) for e in errors)
    stores = list(stores)
    for e in errors:
        if isinstance(e, CloobError):
            return e
        what = f"{type(e).__name__}: {one_line(e)}"
        filename = getattr(e, "filename", None) if isinstance(e, OSError) else None
        where = _where(stores, remote, filename)
        if "credentials encoded in URL" in str(e) or "Cannot combine AUTHORIZATION" in str(e):
            return CloobError(f"the S3 endpoint {endpoint() or ''} was given with a user name and password in it, "
                              "which the S3 client cannot use",
                              "give the endpoint without user:password@ (--endpoint-url or AWS_ENDPOINT_URL) and the "
                              f"credentials as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile), {AGAIN}")
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return CloobError(f"no space left on the device of {where} ({what})",
                              f"free space there or choose another location, {AGAIN}")
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            return CloobError(f"a file in {where} would exceed the largest file size allowed here ({what})",
                              f"raise the file-size limit (ulimit -f) or choose another location, {AGAIN}")
        if remote and _is_timeout(e):
            from cloob.storage_s3 import describe  # imports s3fs: only once an S3 call timed out

            return CloobError(f"the store {where} did not answer in time ({describe()}): {what}",
                              "check that the store is up and reachable (a stopped server or a network that drops "
                              f"packets looks like this), {AGAIN}; the limits are CLOOB_S3_CONNECT_TIMEOUT, "
                              "CLOOB_S3_READ_TIMEOUT and CLOOB_S3_MAX_ATTEMPTS")
        if remote and _is_unreachable(e):
            return CloobError(f"cannot reach the store {where}: {what}",
                              "start the store, or correct its address (--endpoint-url or AWS_ENDPOINT_URL) and the "
                              f"network, {AGAIN}")
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            if remote:
                return CloobError(f"the store {where} refused access: {what}",
                                  "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and "
                                  f"what they may do in the bucket, {AGAIN}")
            return CloobError(f"no permission for {where} ({what})",
                              f"make it readable and writable for this user or choose another location, {AGAIN}")
        if _of_storage_client(e):
            return CloobError(f"the store {where} failed: {what}",
                              "check that the store is reachable and the credentials are valid (network, "
                              f"AWS_ENDPOINT_URL, AWS_* variables), {AGAIN}")
    return None


class QuietStorageTasks(logging.Filter):
    """For the "asyncio" logger: drops "Task exception was never retrieved" records of storage-client
    errors. When the store goes away in the middle of an upload, aiohttp leaves such a task behind
    and asyncio logs its traceback at garbage collection, next to the error that the call itself
    raised, and which is reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or "never retrieved" not in str(record.msg) or not is_storage_error(exc)
