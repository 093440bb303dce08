"""The lock of an s3:// prefix: an object changed only by conditional PUTs and DELETEs."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from cloob.lock.holder import _dump, _parse


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
