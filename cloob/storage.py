"""The one storage layer: every file cloob reads or writes under a storage root goes through here.

A `Location` is a place in storage, a local folder or an object-store prefix (any fsspec URL; also
one file's URL): it joins relative paths, gives their URLs (a plain path locally, `s3://...` on S3),
reads JSON, writes atomically, lists, globs and removes. Every write is atomic: a temporary
'.tmp-*' file renamed into place on a local disk, one PUT on an object store, so a reader sees a file
whole or not at all. Listings never come from a stale cache (other processes write here too), and
leave out hidden names ('.tmp-*' files of writes in progress) unless asked.

Every s3:// file system in the process has time limits and bounded retries (cloob.storage_s3,
registered here); cloob.storage_errors turns a store's failures into one message.

No torch here, so data preparation and its subprocesses start fast.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from typing import Any, Literal

import fsspec
from fsspec.registry import register_implementation, registry


def _limit_s3() -> None:
    """Every s3:// file system made in this process gets cloob's time limits (cloob.storage_s3)."""
    impl = "cloob.storage_s3.LimitedS3FileSystem"
    if "s3" in registry:  # s3fs already loaded: register the class itself
        from cloob.storage_s3 import LimitedS3FileSystem

        register_implementation("s3", LimitedS3FileSystem, clobber=True)
    else:  # by name: s3fs (a third of a second) is imported only when an s3:// URL is opened
        register_implementation("s3", impl, clobber=True, errtxt="install s3fs to use s3:// URLs")


_limit_s3()

# A URL's user:password@ and its query string (a presigned URL's signature and key id ride there), in
# a URL or anywhere in a text; the fragment goes with the query.
_URL_SECRETS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^/\s@\"'<>]+@)?(?P<rest>[^\s\"'<>?#]*)"
                          r"(?:[?#][^\s\"'<>]*)?")


def redact(text: str) -> str:
    """`text` (a URL, or a message holding URLs) with every URL's credentials cut out: the user:password@
    and the query string. The one rule for everything cloob logs, prints or records (manifests, results,
    lineage, errors). Local paths are returned as they are."""
    return _URL_SECRETS.sub(lambda m: m["scheme"] + m["rest"], str(text))


def protocol_of(fs) -> str:
    """An fsspec file system's primary protocol ("file", "s3", "http", ...): fs.protocol is a string
    or a tuple of its names, the first the one it is known by."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_local(fs) -> bool:
    """Whether an fsspec file system is the local disk."""
    return protocol_of(fs) in ("file", "local")


def _atomic_write(fs, path: str, data: bytes) -> None:
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


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write data to url so that readers see either nothing or all of it."""
    fs, path = fsspec.core.url_to_fs(url)
    _atomic_write(fs, path, data)


class Location:
    """A local folder or object-store prefix (or one file), reached through fsspec.

    Paths given to the methods are relative to the location ('' is the location itself) and use '/'.
    `fs` and `path()` are there for what this class does not wrap (streaming reads, library calls
    that take a file system)."""

    def __init__(self, url: str):
        """url: a local path or any fsspec URL. An unknown protocol raises ValueError, a missing
        file-system package ImportError."""
        fs, root = fsspec.core.url_to_fs(url)
        # fsspec keeps '..' and '.' in a local path: `gone/../ds` would go through (and makedirs
        # create) gone/, and messages would name the folder so.
        self._set(fs, os.path.abspath(root) if is_local(fs) else root)

    @classmethod
    def on(cls, fs, root: str) -> Location:
        """The location at path `root` of an fsspec file system already open."""
        loc = cls.__new__(cls)
        loc._set(fs, root)
        return loc

    def _set(self, fs, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"  # the location's path on fs (absolute for a local one)
        self.is_local = is_local(fs)

    def __repr__(self) -> str:
        return f"Location({self.url()!r})"

    # ------------------------------------------------------------------------------------- names
    def path(self, rel: str = "") -> str:
        """rel's path on `fs`."""
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """rel's URL: a plain path locally, protocol://... elsewhere."""
        return self.url_of(self.path(rel))

    def url_of(self, path: str) -> str:
        """The URL of a path on `fs` (as a listing of `fs` gives it)."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def sub(self, rel: str) -> Location:
        """The location at rel, on the same file system."""
        return Location.on(self.fs, self.path(rel))

    # ------------------------------------------------------------------------------------- tests
    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self.path(rel))

    def isfile(self, rel: str = "") -> bool:
        return self.fs.isfile(self.path(rel))

    def size(self, rel: str = "") -> int:
        return self.fs.size(self.path(rel))

    # ----------------------------------------------------------------------------------- reading
    def open(self, rel: str = "", mode: str = "rb", **kwargs):
        """A file object (for streaming reads; write through write_bytes/write_json instead)."""
        return self.fs.open(self.path(rel), mode, **kwargs)

    def read_bytes(self, rel: str = "") -> bytes:
        """The file's bytes; FileNotFoundError if there is none."""
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str = "") -> Any:
        """The parsed file, or None if there is none. A damaged file raises ValueError, a storage
        failure OSError: callers that treat those as absent catch them."""
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    # ----------------------------------------------------------------------------------- writing
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write the file atomically (readers see nothing or all of it); parent folders are made."""
        _atomic_write(self.fs, self.path(rel), data)

    def write_json(self, rel: str, obj: Any, **dumps) -> None:
        """write_bytes of json.dumps(obj, **dumps) (the keyword arguments decide the file's bytes)."""
        self.write_bytes(rel, json.dumps(obj, **dumps).encode())

    def move_in(self, local_file: str, rel: str) -> None:
        """Move a finished local file to rel atomically: a rename locally (same file system), one
        upload elsewhere (then the local file is deleted)."""
        path = self.path(rel)
        if self.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            os.replace(local_file, path)
        else:
            self.fs.put_file(local_file, path)
            os.unlink(local_file)

    def copy_in(self, local: str, rel: str = "") -> None:
        """Copy a local file, or a local folder's contents, to rel (the source stays)."""
        if os.path.isdir(local):
            self.fs.put(str(local).rstrip("/") + "/", self.path(rel), recursive=True)
        else:
            self.fs.put_file(str(local), self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        """Delete the file (or with recursive, the folder and all under it); nothing if it is gone.
        Never expands glob characters in a file's name."""
        try:
            if recursive:
                self.fs.rm(self.path(rel), recursive=True)
            else:
                self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------------------------- listing
    def refresh(self) -> None:
        """Forget every cached listing of this file system (s3fs caches them per instance)."""
        self.fs.invalidate_cache()

    def list(self, rel: str = "", *, kind: Literal["file", "directory"] | None = None,
             hidden: bool = False) -> list[str]:
        """The sorted names directly under rel ([] if it does not exist), read afresh: files and
        folders, or only one kind; names starting with '.' only with hidden."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)  # other processes write here: never trust a cached listing
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            name = posixpath.basename(e["name"].rstrip("/"))
            if name and (kind is None or e["type"] == kind) and (hidden or not name.startswith(".")):
                names.append(name)
        return sorted(names)

    def glob(self, pattern: str, *, hidden: bool = False) -> list[str]:
        """The sorted paths (relative to the location) matching a glob pattern relative to it; names
        starting with '.' only with hidden."""
        found = self.fs.glob(self.path(pattern))
        return sorted(rel for rel in (posixpath.relpath(p, self.root) for p in found)
                      if hidden or not posixpath.basename(rel).startswith("."))

    def files(self, rel: str = "") -> list[tuple[str, int]]:
        """Every file under rel, at any depth: sorted (path relative to the location, size) pairs."""
        found = self.fs.find(self.path(rel), detail=True)
        return sorted((posixpath.relpath(p, self.root), int(d.get("size") or 0)) for p, d in found.items())
