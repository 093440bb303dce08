"""Shard reads from a bucket that survive a dropped connection.

A shard on s3:// is read as one streaming GET (as `aws s3 cp` and boto3's get_object do), not in
s3fs's ranged blocks. When the connection breaks off in the middle (reset, broken pipe, a body cut
short, a read that times out), the reader opens the object again with `Range: bytes=<offset>-` at the
first byte it has not delivered yet, so the tar reader above it sees the same bytes as from an
undisturbed read: the samples, their order and the training are those of an undisturbed run. The
object's ETag is checked on every reopen: a shard replaced while being read is not spliced from two
versions, it is unreadable. Other remote protocols (http(s), gs, ...) get the same retries through
their fsspec file, reopened and seeked to the offset. Local files are read as before.

Limits (environment, read when a shard is opened; each GET also has botocore's time limits and
attempts, cloob.storage_s3):

    CLOOB_SHARD_READ_RETRIES    reopens in a row without a byte of progress before the shard is
                                given up (default 5); a reopen that delivers bytes starts the count
                                again, so a long shard can ride out many drops, each bounded; one
                                shard gets at most 10 times as many reopens in all
    CLOOB_SHARD_READ_BACKOFF_S  the wait before the first reopen, doubled for each further one in a
                                row, at most 30 s (default 0.5)

A shard given up after its retries (and one that cannot be opened at all: missing, no permission)
raises OSError, which the stream counts as a bad shard and skips (cloob.data.stream). Every reopen is
logged with the shard, the byte offset and the error, and counted: the batches carry the count
(`read_retries`), and the trainer logs it to metrics.jsonl.
"""

from __future__ import annotations

import http.client
import io
import logging
import time
from collections.abc import Callable

import fsspec

from cloob.storage import is_local, protocol_of

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
CHUNK = 1 << 20  # bytes asked of the connection per read; the buffer above it has the same size


class ShardChanged(OSError):
    """The object was replaced between two reads of one shard: its bytes cannot be spliced."""


def read_limits() -> tuple[int, float]:
    """(retries, first back-off in seconds) from the environment."""
    from cloob.settings import env_number

    return (int(env_number("CLOOB_SHARD_READ_RETRIES", DEFAULT_RETRIES, integer=True)),
            float(env_number("CLOOB_SHARD_READ_BACKOFF_S", DEFAULT_BACKOFF_S)))


def _retryable() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError, TimeoutError, http.client.HTTPException, EOFError]
    try:
        import aiohttp

        kinds.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import BotoCoreError

        kinds.append(BotoCoreError)
    except ImportError:
        pass
    return tuple(kinds)


# Errors that another try would only repeat.
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ShardChanged)


class ResumingReader(io.RawIOBase):
    """A raw, read-only, forward stream of one remote object; reopens at the current offset after a
    connection error, up to `retries` times in a row, waiting `backoff` s, then twice that, ...

    on_retry(n) is called once per reopen with the count of this reader so far."""

    def __init__(self, url: str, *, retries: int | None = None, backoff: float | None = None,
                 on_retry: Callable[[int], None] | None = None):
        super().__init__()
        env_retries, env_backoff = read_limits()
        self.url = url
        self.retries = env_retries if retries is None else retries
        self.backoff = env_backoff if backoff is None else backoff
        self.on_retry = on_retry
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.s3 = protocol_of(self.fs) in ("s3", "s3a")
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self.reopened = 0  # reopens of this object, all together
        self.max_reopens = 10 * self.retries
        self._body = None  # s3: the response body of the open GET; else: the fsspec file
        self._broken: BaseException | None = None  # s3: the error that ended the body's last read
        self._kinds = _retryable()
        self._with_retries(self._open)

    # -- io.RawIOBase
    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        if not len(b):
            return 0

        def once() -> int:
            if self._body is None:
                self._open()
            data = self._read(min(len(b), CHUNK))
            if not data:
                if self.size is not None and self.pos < self.size:
                    raise http.client.IncompleteRead(b"", self.size - self.pos)
                return 0
            n = len(data)
            b[:n] = data
            self.pos += n
            return n

        return self._with_retries(once)

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()

    # -- retries
    def _with_retries(self, fn):
        failed = 0
        while True:
            try:
                return fn()
            except _FINAL:
                self._drop()
                raise
            except self._kinds as e:
                self._drop()
                failed += 1
                if failed > self.retries or self.reopened >= self.max_reopens:
                    why = (f"{self.retries} reopens in a row did not get further" if failed > self.retries
                           else f"it was reopened {self.reopened} times")
                    raise OSError(f"{self.url}: reading broke off at byte {self.pos}"
                                  f"{f' of {self.size}' if self.size is not None else ''} and {why}; last error: "
                                  f"{type(e).__name__}: {str(e)[:200]}") from e
                self.reopened += 1
                if self.on_retry is not None:
                    self.on_retry(self.reopened)
                wait = min(self.backoff * 2 ** (failed - 1), MAX_BACKOFF_S)
                log.warning("shard read broke off at byte %d of %s (%s: %s); reopening from there in %.2g s "
                            "(try %d of %d)", self.pos, self.url, type(e).__name__, str(e)[:200], wait, failed,
                            self.retries)
                time.sleep(wait)

    # -- the two ways to read: a streaming GET on S3, an fsspec file elsewhere
    def _open(self) -> None:
        if self.s3:
            bucket, key, version = self.fs.split_path(self.path)
            kw = {"Bucket": bucket, "Key": key}
            if version:
                kw["VersionId"] = version
            if self.pos:
                kw["Range"] = f"bytes={self.pos}-"
            resp = self.fs.call_s3("get_object", **kw)
            etag = resp.get("ETag")
            if self.etag is not None and etag != self.etag:
                self._body = resp["Body"]
                raise ShardChanged(f"{self.url} was replaced while being read (ETag {self.etag} -> {etag})")
            self.etag = etag
            if self.size is None:
                self.size = self.pos + int(resp["ContentLength"])
            self._body = resp["Body"]
        else:
            f = self.fs.open(self.path, "rb")
            self._body = f
            if self.size is None:
                self.size = getattr(f, "size", None)
            if self.pos:
                f.seek(self.pos)

    def _read(self, n: int) -> bytes:
        if self.s3:  # one hop to the event loop's thread for up to n bytes, not one for each network chunk
            if self._broken is not None:  # bytes before the break were delivered; now the break itself
                e, self._broken = self._broken, None
                raise e
            data, self._broken = fsspec.asyn.sync(self.fs.loop, _read_up_to, self._body, n)
            if not data and self._broken is not None:
                e, self._broken = self._broken, None
                raise e
            return data
        return self._body.read(n)

    def _drop(self) -> None:
        self._broken = None
        body, self._body = self._body, None
        if body is None:
            return
        try:
            if self.s3:
                fsspec.asyn.sync(self.fs.loop, _aclose, body)
            else:
                body.close()
        except Exception:  # a connection already gone: nothing left to release
            pass


async def _read_up_to(body, n: int) -> tuple[bytes, BaseException | None]:
    """(up to n bytes of the body, fewer only at its end or before an error; the error or None). The
    bytes that arrived before a break are kept, so the reopen starts right after them."""
    parts, got = [], 0
    while got < n:
        try:
            chunk = await body.read(n - got)
        except Exception as e:  # noqa: BLE001 (the caller sorts retryable from final)
            return b"".join(parts), e
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), None


async def _aclose(body) -> None:
    body.close()


def read_head(url: str, n: int) -> bytes:
    """The first n bytes of the shard at url (fewer if it is shorter), without reading the rest. From
    an object store: one ranged read (a stream cut off after n bytes would make the store send up to a
    buffer's worth of a shard that may be gigabytes). Over HTTP: a stream, closed after n bytes, since a
    server may ignore Range and send the whole shard for a ranged read (python -m http.server does)."""
    fs, path = fsspec.core.url_to_fs(url)
    if protocol_of(fs) in ("http", "https"):
        with fs.open(path, "rb", block_size=0) as f:
            return f.read(n)
    return fs.cat_file(path, start=0, end=n)


def open_shard(url: str, on_retry: Callable[[int], None] | None = None) -> io.BufferedIOBase:
    """A binary file of the shard at url: a ResumingReader behind a buffer for remote URLs, the plain
    file for local ones. Raises OSError when the shard cannot be opened (after the retries)."""
    fs, _ = fsspec.core.url_to_fs(url)
    if is_local(fs):
        return fsspec.open(url, "rb").open()
    return io.BufferedReader(ResumingReader(url, on_retry=on_retry), buffer_size=CHUNK)
