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

import contextlib
import errno

from torch.utils.data import IterableDataset

from cloob.data.stream import NoUsableData
from cloob.errors import CloobError
from cloob.storage_errors import QuietStorageTasks  # noqa: F401  (the training loop's filter, defined with the mapping)
from cloob.storage_errors import chain as _chain
from cloob.storage_errors import is_storage_error as _is_storage_error
from cloob.storage_errors import one_line as _one_line

RESUME = "then rerun the same command: it resumes from the last complete checkpoint"
_ERROR_KEY = "__cloob_error__"


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


@contextlib.contextmanager
def writing_checkpoint(step: int, last, *, run_dir: str, data: str):
    """Around the write of step's checkpoint: a store that fails it (down, timed out, full) stops the
    run with one error naming the last complete checkpoint (`last`, a CheckpointRef or None).

    Stopping, not training on to retry at the next checkpoint: work that cannot be saved is lost
    either way, and more of it the longer the run goes on; the other ranks would wait at the
    checkpoint's barrier meanwhile; a store that is down usually serves the data shards too. A rerun
    resumes from the named checkpoint exactly (every write is atomic: the failed one leaves no
    half-checkpoint that a resume would take)."""
    try:
        yield
    except Exception as e:
        err = as_cloob_error(e, run_dir=run_dir, data=data)
        if err is None or err is e:
            raise
        kept = f"its last complete checkpoint is {last.url} (step {last.step})" if last else \
            "it has no complete checkpoint yet (a rerun starts over)"
        raise CloobError(f"{err.problem}; the checkpoint of step {step} was not written and the run stopped: {kept}",
                         err.fix) from None


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
