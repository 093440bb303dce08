"""Find a dataset's shards and count its samples from img2dataset's NNNNN_stats.json files.

A source is a folder or fsspec URL (local path, s3://, http(s):// needs a brace pattern since HTTP
cannot list), a brace pattern (`s3://b/cc3m/{00000..00099}.tar`) or a glob (`/data/*.tar`).
img2dataset writes NNNNN_stats.json last, so a tar without one is an unfinished shard and is left out.

Versions of a dataset that `cloob prepare` made (cloob.prepare.versions): `<folder>@vN` is version N
(its JSON, `_cloob/versions/vN.json`, names its shards and the samples it leaves out: rows removed
from the source); the URL of that JSON or of `_cloob/manifest.json` is read the same way; a folder
whose manifest is a version's (the dataset has a second version) is its newest version. A folder
with one version, and any folder of shards that cloob did not make, is listed as before (its finished
tars, in name order). Only JSON is read here: the training node needs no cloob.prepare.
"""

from __future__ import annotations

import logging
import posixpath
import re
from dataclasses import dataclass

from braceexpand import braceexpand

from cloob.errors import CloobError
from cloob.storage import Location

log = logging.getLogger(__name__)


VERSIONS_DIR = "versions"  # under the dataset's _cloob/
_AT_VERSION = re.compile(r"^(.+?)/*@v(\d+)$")
_VERSION_JSON = re.compile(r"^(.+)/_cloob/versions/v(\d+)\.json$")
_MANIFEST_JSON = re.compile(r"^(.+)/_cloob/manifest\.json$")


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    counts: list[int | None]  # successes per shard from its stats file (or version); None where unknown
    exclude_keys: frozenset[str] = frozenset()  # sample keys the version leaves out (removed rows)
    version: int | None = None  # the dataset version, where cloob prepare made the data
    content_hash: str | None = None  # that version's content hash

    @property
    def num_samples(self) -> int | None:
        if any(c is None for c in self.counts):
            return None
        return sum(self.counts) - len(self.exclude_keys)


@dataclass(frozen=True)
class VersionRef:
    folder: str  # the dataset folder
    version: int | None  # None: the newest
    manifest_url: str  # the JSON that names the version's shards


def read_version_ref(source: str) -> VersionRef | None:
    """Which dataset version `source` names, or None where it names shards directly (a folder with
    no second version, a brace pattern, a glob, a tar)."""
    if not source or "{" in source:
        return None
    if m := _AT_VERSION.match(source):
        folder, n = m.group(1), int(m.group(2))
        url = Location(folder).url(f"_cloob/{VERSIONS_DIR}/v{n}.json")
        if n == 1 and not Location(url).exists():  # a dataset with one version: its manifest
            url = Location(folder).url("_cloob/manifest.json")
        return VersionRef(folder, n, url)
    if m := _VERSION_JSON.match(source):
        return VersionRef(m.group(1), int(m.group(2)), source)
    if m := _MANIFEST_JSON.match(source):
        return VersionRef(m.group(1), None, source)
    return None


def _versioned(ref: VersionRef, source: str) -> ShardSet:
    try:
        m = Location(ref.manifest_url).read_json()
    except ValueError as e:
        raise CloobError(f"{ref.manifest_url} is damaged (not valid JSON: {str(e)[:120]}); cloob writes it whole, so "
                         "something else changed it",
                         "`cloob prepare` on the folder restores the newest version's file from its copy "
                         "(_cloob/manifest.json); an older version's file has no copy: restore it from a backup, "
                         "or train on another version") from None
    except OSError as e:
        raise CloobError(f"cannot read {ref.manifest_url}: {type(e).__name__}: {e}",
                         "check the URL, network and credentials (AWS_* environment or config)") from None
    if m is None or not m.get("shards"):
        have = _versions_here(ref.folder)
        raise CloobError(f"training data {source!r}: there is no {posixpath.basename(ref.manifest_url)} at "
                         f"{ref.folder}" + (f" (versions there: {', '.join(f'v{n}' for n in have)})" if have else ""),
                         "name a version that exists (data.train=<folder>@vN), or prepare the dataset first")
    version = int(m.get("version", 1))
    if ref.version is not None and version != ref.version:
        raise CloobError(f"{ref.manifest_url} holds version {version}, not {ref.version}",
                         "the dataset folder is damaged: prepare it again into a new folder")
    loc = Location(ref.folder)
    return ShardSet([loc.url(e["shard"]) for e in m["shards"]], [int(e["successes"]) for e in m["shards"]],
                    frozenset(m.get("excluded_keys") or ()), version, m.get("content_hash"))


def _versions_here(folder: str) -> list[int]:
    try:
        names = Location(folder).glob(f"_cloob/{VERSIONS_DIR}/v*.json")
    except (OSError, ValueError):
        return []
    return sorted(int(n) for n in (posixpath.basename(p)[1:-5] for p in names) if n.isdigit())


def _newest(source: str) -> tuple[VersionRef | None, dict | None]:
    """For a dataset folder: (its newest version, where the dataset has a second one; its manifest)."""
    try:
        m = Location(source).read_json("_cloob/manifest.json")
    except (OSError, ValueError):
        return None, None
    if m and "version" in m:
        return VersionRef(source.rstrip("/"), None, Location(source).url("_cloob/manifest.json")), m
    return None, m


def _stats_url(tar_url: str) -> str:
    return tar_url[: -len(".tar")] + "_stats.json"


def list_shards(source: str) -> ShardSet:
    """Resolve a source to its finished shards and their sample counts; raise CloobError if none."""
    if not source:
        raise CloobError("no training data given (data.train is empty)",
                         "pass data.train=<folder or URL of webdataset shards>")
    ref = read_version_ref(source)
    manifest = None
    if ref is None and "{" not in source and not any(ch in source for ch in "*?[") and not source.endswith(".tar"):
        ref, manifest = _newest(source)
    if ref is not None:
        return _versioned(ref, source)
    try:
        if "{" in source:
            urls = list(braceexpand(source))
            Location(urls[0])  # an unknown protocol or a missing file-system package fails here, once
        else:
            loc = Location(source)
            if any(ch in source for ch in "*?["):
                urls = sorted(loc.url_of(p) for p in loc.fs.glob(source))
            elif source.endswith(".tar"):
                urls = [source]
            elif loc.fs.isdir(source):
                urls = [loc.url(p) for p in loc.glob("*.tar", hidden=True)]
            else:
                raise CloobError(f"training data {source!r} does not exist",
                                 "check the path; prepare shards first (img2dataset layout: NNNNN.tar)")
    except CloobError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise CloobError(f"cannot list training data {source!r}: {type(e).__name__}: {e}",
                         "check the URL, network and credentials (AWS_* environment or config)") from None
    urls = [u for u in urls if u.endswith(".tar")]
    if not urls:
        raise CloobError(f"no .tar shards found at {source!r}",
                         "point data.train at a folder of NNNNN.tar shards, a brace pattern or a glob")
    counts = [_read_count(u) for u in urls]
    if any(c is not None for c in counts):
        unfinished = [u for u, c in zip(urls, counts) if c is None]
        if unfinished:
            log.warning("leaving out %d shard(s) without a stats file (unfinished): %s",
                        len(unfinished), ", ".join(unfinished[:3]))
        urls, counts = [u for u, c in zip(urls, counts) if c is not None], [c for c in counts if c is not None]
    if manifest and [posixpath.basename(u) for u in urls] == [e["shard"] for e in manifest.get("shards", [])]:
        return ShardSet(urls, counts, version=1, content_hash=manifest.get("content_hash"))
    return ShardSet(urls, counts)


def _read_count(tar_url: str) -> int | None:
    try:
        stats = Location(_stats_url(tar_url)).read_json()
        return None if stats is None else int(stats["successes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("unreadable stats file for %s (%s); treating the shard as unfinished", tar_url, e)
        return None
