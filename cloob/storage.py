"""Storage primitives shared by every writer: local-or-remote test and atomic writes (no torch here,
so data preparation and its subprocesses start fast)."""

from __future__ import annotations

import os
import tempfile

import fsspec


def is_local(fs) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write data to url so that readers see either nothing or all of it."""
    fs, path = fsspec.core.url_to_fs(url)
    if is_local(fs):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes 0600; a published file is as readable as any other
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        # Object stores publish an object only when its upload completes: one PUT is atomic.
        fs.pipe_file(path, data)
