"""Verified downloads into a local cache, and archive extraction that cannot write outside its target.

Downloads: http(s) goes through urllib (a socket `timeout`, resume of a `.part` file with a Range
request); any other fsspec URL (s3://, gs://, ...) is streamed through fsspec; a local path or
file:// URL is verified where it lies, without a copy. A finished download is renamed from `.part`
to its cache name only after its size and sha256 match what the caller expects (when it expects
anything), so a file in the cache is always complete. The cache is `CLOOB_CACHE` or
~/.cache/cloob/downloads, one file per URL: `<sha256(url)[:16]>-<file name>`.

Extraction (zip, tar, tar.gz/tgz, tar.bz2, tar.xz): every member is checked before anything is
written. Absolute names, `..` components, links whose target leaves the target folder, members
reached through a link, and devices or FIFOs refuse the whole archive with a CloobError naming the
member. Tar extraction also runs under Python's `data` filter, as a second line of defence.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.client
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from cloob.errors import CloobError
from cloob.storage import redact

_CHUNK = 1 << 20
_UA = "cloob-prepare/1 (+https://github.com/ml-jku/cloob)"


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLOOB_CACHE") or Path.home() / ".cache" / "cloob" / "downloads")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _local_path(url: str) -> Path | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if not parts.scheme or len(parts.scheme) == 1:
        return Path(url).expanduser()
    return None


def url_filename(url: str) -> str:
    """The file name a URL (or path) ends in, safe to use as a local name."""
    name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(str(url)).path)) or "download"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:]


def cache_path(url: str, cache_dir: str | Path | None = None) -> Path:
    name = url_filename(url)
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"{key}-{name}"


def verify(path: Path, size: int | None, sha256: str | None, what: str) -> str:
    """Check size and sha256 where given; return the file's sha256. Raises CloobError on a mismatch."""
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise CloobError(f"{what}: expected {size} bytes, got {got_size}",
                         "the download is incomplete or the file changed upstream: run again; if it "
                         "persists, check source.size in the spec")
    got = sha256_file(path)
    if sha256 is not None and got != sha256.lower():
        raise CloobError(f"{what}: sha256 mismatch: expected {sha256.lower()}, got {got}",
                         "the file is corrupt or changed upstream: run again to download it afresh; if "
                         "it persists, check source.sha256 in the spec")
    return got


def download(url: str, *, size: int | None = None, sha256: str | None = None,
             cache_dir: str | Path | None = None, timeout: float = 60.0,
             progress: bool = True) -> tuple[Path, str]:
    """Fetch url into the cache (or verify a local file in place); return (path, sha256).

    A bad file (wrong size or sha256) is deleted and a CloobError names expected and got.
    """
    local = _local_path(url)
    if local is not None:  # a local archive: verify it where it is, never delete the user's file
        if not local.is_file():
            raise CloobError(f"archive {local} does not exist", "pass the path of the downloaded archive")
        return local, verify(local, size, sha256, str(local))

    final = cache_path(url, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    shown = redact(url)
    # One downloader per URL at a time: a second process waits here and then finds the file cached.
    with open(final.with_name(final.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            try:
                return final, verify(final, size, sha256, f"cached {final}")
            except CloobError:
                final.unlink()  # stale or corrupt cache entry: fetch it again
        part = final.with_name(final.name + ".part")
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme in ("http", "https"):
            _fetch_http(url, part, timeout=timeout, progress=progress, shown=shown)
        else:
            _fetch_fsspec(url, part, progress=progress, shown=shown)
        try:
            digest = verify(part, size, sha256, f"download of {shown}")
        except CloobError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, final)
        return final, digest


def _bar(total: int | None, initial: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not progress, file=sys.stderr, dynamic_ncols=True)


def _fetch_http(url: str, part: Path, *, timeout: float, progress: bool, shown: str) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _UA}
    if have:
        headers["Range"] = f"bytes={have}-"
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:  # urllib does not take user:password@host itself
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is already whole (or longer): let verify() judge it
            return
        raise CloobError(f"download of {shown} failed: HTTP {e.code} {e.reason}",
                         "check the URL and your network; for a mirror or a local copy pass --source") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CloobError(f"download of {shown} failed: {reason}",
                         "check your network (or proxy settings) and run again; a partial download resumes")\
            from None
    with resp:
        if have and resp.status != 206:  # the server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, _bar(total, have, url_filename(shown), progress) as bar:
            try:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise CloobError(f"download of {shown} stopped after {f.tell()} bytes: {e}",
                                 "run again: the download resumes from where it stopped") from None
        got = part.stat().st_size
        if total is not None and got < total:
            raise CloobError(f"download of {shown} stopped after {got} of {total} bytes",
                             "run again: the download resumes from where it stopped")


def _fetch_fsspec(url: str, part: Path, *, progress: bool, shown: str) -> None:
    from cloob.storage import Location

    try:
        src_loc = Location(url)
        total = src_loc.size()
        with src_loc.open() as src, open(part, "wb") as f, \
                _bar(total, 0, posixpath.basename(src_loc.root), progress) as bar:
            while chunk := src.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    except (OSError, ValueError, ImportError) as e:
        part.unlink(missing_ok=True)
        raise CloobError(f"download of {shown} failed: {type(e).__name__}: {e}",
                         "check the URL, your credentials (environment / config) and the network") from None


# ------------------------------------------------------------------------------------------ extraction

def archive_format(path: str | Path) -> str:
    """'zip' or 'tar' (plain or compressed), from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" or head[257:262] == b"ustar":
        return "tar"
    if zipfile.is_zipfile(path):  # e.g. a self-extracting prefix
        return "zip"
    raise CloobError(f"{path} is neither a zip nor a tar archive",
                     "check source.url in the spec: it must point to a .zip, .tar, .tar.gz or .tgz file")


def _name_problem(name: str) -> str | None:
    if not name or "\x00" in name:
        return "has an empty or NUL-containing name"
    n = name.replace("\\", "/")  # archives made on Windows may use backslashes
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        return "has an absolute path"
    if ".." in n.split("/"):
        return "has a '..' component"
    return None


def _leaves(path: str) -> bool:
    p = posixpath.normpath(path)
    return p.startswith("/") or p == ".." or p.startswith("../")


def _refuse(archive: Path, member: str, problem: str) -> CloobError:
    return CloobError(f"refusing to extract {archive.name}: member {member!r} {problem}",
                      "the archive is malformed or malicious; nothing was extracted. Download it again from "
                      "the official source, or check source.url in the spec")


def _check(archive: Path, entries: list[tuple[str, str, str | None]]) -> None:
    """entries: (name, kind, link target) with kind 'file', 'dir', 'symlink', 'hardlink' or 'special'."""
    links = set()
    for name, kind, target in entries:
        if (problem := _name_problem(name)) is not None:
            raise _refuse(archive, name, problem)
        norm = posixpath.normpath(name.replace("\\", "/"))
        if kind == "special":
            raise _refuse(archive, name, "is a device or FIFO")
        if kind == "symlink":
            if target is None or target.startswith("/") or _leaves(posixpath.join(posixpath.dirname(norm), target)):
                raise _refuse(archive, name, f"is a symlink to {target!r}, outside the extraction folder")
            links.add(norm)
        elif kind == "hardlink":
            if target is None or _name_problem(target) is not None or _leaves(target):
                raise _refuse(archive, name, f"is a hard link to {target!r}, outside the extraction folder")
            links.add(norm)
    # A member written "through" a link (link a -> elsewhere, then a/x) could land anywhere.
    for name, _, _ in entries:
        parts = posixpath.normpath(name.replace("\\", "/")).split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise _refuse(archive, name, f"lies inside the link {'/'.join(parts[:i])!r}")


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.isdev():  # character/block devices and FIFOs
        return "special"
    return "dir" if m.isdir() else "file"


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "special"
    return "dir" if info.is_dir() else "file"


def safe_extract(archive: str | Path, dest: str | Path, progress: bool = False) -> int:
    """Extract archive into the folder dest after checking every member; return the member count."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive_format(archive) == "zip":
            return _extract_zip(archive, dest, progress)
        return _extract_tar(archive, dest, progress)
    except tarfile.FilterError as e:  # the data filter caught something that _check let through
        raise _refuse(archive, e.tarinfo.name, str(e)) from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CloobError(f"cannot read {archive}: {type(e).__name__}: {e}",
                         "the archive is damaged or truncated: delete it and download it again") from None


def _progress(items, archive: Path, progress: bool):
    from tqdm import tqdm

    return tqdm(items, desc=f"extracting {archive.name}", unit="file", disable=not progress, file=sys.stderr)


def _extract_zip(archive: Path, dest: Path, progress: bool) -> int:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        entries = []
        for i in infos:
            kind = _zip_kind(i)
            target = zf.read(i).decode("utf-8", "replace") if kind == "symlink" else None
            entries.append((i.filename, kind, target))
        _check(archive, entries)
        for info, (_, kind, _) in zip(_progress(infos, archive, progress), entries):
            out = dest.joinpath(*[p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")])
            if kind == "dir":
                out.mkdir(parents=True, exist_ok=True)
                continue
            # zip symlinks (inside the folder, checked above) are written as small plain files, as
            # zipfile itself does: no link is ever created.
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f, _CHUNK)
        return len(infos)


def _extract_tar(archive: Path, dest: Path, progress: bool) -> int:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()  # reads the whole (decompressed) stream once: nothing written yet
        _check(archive, [(m.name, _tar_kind(m), m.linkname if (m.issym() or m.islnk()) else None)
                         for m in members])
        for m in _progress(members, archive, progress):
            tf.extract(m, dest, set_attrs=False, filter="data")
        return len(members)
