"""What a failed training run tells its user: the errors of its environment as CloobError (a problem
and its fix), and the guard that brings them out of DataLoader worker processes intact.

A full disk, a file-size limit, a lost object store or its credentials are no bugs of cloob: each
becomes one message saying what happened and that a rerun resumes from the last complete checkpoint
(every checkpoint is written atomically, so a failure never damages the ones before it). Anything
else stays what it is, with its traceback.

torch re-raises an exception from a DataLoader worker in the main process as a new exception built
from the worker's traceback text, so neither its type nor its message survives. The guard turns the
error into a CloobError inside the worker and hands it over as an ordinary item of the stream.
"""

from __future__ import annotations

import errno
import logging

from torch.utils.data import IterableDataset

from cloob.data.stream import NoUsableData
from cloob.errors import CloobError

RESUME = "then rerun the same command: it resumes from the last complete checkpoint"
_ERROR_KEY = "__cloob_error__"

# Exception types of the storage clients, by module, so that none of them must be installed here.
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3", "requests", "gcsfs", "adlfs")


def _one_line(text: object, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_storage_error(e: BaseException) -> bool:
    return any(c.__module__.split(".")[0] in _STORAGE_MODULES for c in type(e).__mro__) or \
        isinstance(e, (ConnectionError, TimeoutError))


def as_cloob_error(exc: BaseException, *, run_dir: str, data: str) -> CloobError | None:
    """The CloobError that `exc` (or an exception it was raised from) stands for, or None for one
    that is not known here (a bug: keep its traceback)."""
    for e in _chain(exc):
        if isinstance(e, CloobError):
            return e
        if isinstance(e, NoUsableData):
            return CloobError(f"no usable training samples in {data}: {_one_line(e)}",
                              "check the shards (images, .txt captions) or prepare them again")
        what = f"{type(e).__name__}: {_one_line(e)}"
        if isinstance(e, RuntimeError) and "DataLoader timed out" in str(e):
            return CloobError(f"no batch came from the data workers of {data} in time ({what})",
                              f"a worker is stuck or the storage stopped answering: check the data and the network, "
                              f"{RESUME}")
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return CloobError(f"no space left on the device of the run {run_dir} ({what})",
                              "free space there or lower train.keep_checkpoints (a new checkpoint is written "
                              f"before the oldest is removed, so keep_checkpoints + 1 must fit), {RESUME}")
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            return CloobError(f"a file of the run {run_dir} would exceed the largest file size allowed here "
                              f"({what})", f"raise the file-size limit (ulimit -f) or choose another train.output, "
                              f"{RESUME}")
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return CloobError(f"cannot write the run {run_dir} ({what})",
                              f"make train.output writable or choose another one, {RESUME}")
        if _is_storage_error(e):
            return CloobError(f"lost the storage while training (run {run_dir}, data {data}): {what}",
                              "check that the storage is reachable and the credentials are valid (network, "
                              f"AWS_ENDPOINT_URL, AWS_* variables), {RESUME}")
    return None


class QuietStorageTasks(logging.Filter):
    """For the "asyncio" logger: drops "Task exception was never retrieved" records of storage-client
    errors. When the store goes away in the middle of an upload, aiohttp leaves such a task behind
    and asyncio logs its traceback at garbage collection, next to the error that the call itself
    raised, and which is reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or "never retrieved" not in str(record.msg) or not _is_storage_error(exc)


class ReportErrors(IterableDataset):
    """Wraps the training stream: in a DataLoader worker (or in the main process without workers),
    an error known to as_cloob_error ends the stream with one item carrying it; `checked` raises it
    in the training process."""

    def __init__(self, dataset: IterableDataset, *, run_dir: str, data: str):
        self.dataset, self.run_dir, self.data = dataset, run_dir, data

    def __iter__(self):
        try:
            yield from self.dataset
        except Exception as e:
            err = as_cloob_error(e, run_dir=self.run_dir, data=self.data)
            if err is None:
                raise
            yield {_ERROR_KEY: (err.problem, err.fix)}


def checked(batches):
    """The batches of a DataLoader over ReportErrors, raising the error a worker handed over."""
    for batch in batches:
        if _ERROR_KEY in batch:
            raise CloobError(*batch[_ERROR_KEY])
        yield batch
