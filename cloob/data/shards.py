"""Find a dataset's shards and count its samples from img2dataset's NNNNN_stats.json files.

A source is a folder or fsspec URL (local path, s3://, http(s):// needs a brace pattern since HTTP
cannot list), a brace pattern (`s3://b/cc3m/{00000..00099}.tar`) or a glob (`/data/*.tar`).
img2dataset writes NNNNN_stats.json last, so a tar without one is an unfinished shard and is left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from braceexpand import braceexpand

from cloob.errors import CloobError
from cloob.storage import Location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    counts: list[int | None]  # successes per shard from its stats file; None where unknown

    @property
    def num_samples(self) -> int | None:
        if any(c is None for c in self.counts):
            return None
        return sum(self.counts)


def _stats_url(tar_url: str) -> str:
    return tar_url[: -len(".tar")] + "_stats.json"


def list_shards(source: str) -> ShardSet:
    """Resolve a source to its finished shards and their sample counts; raise CloobError if none."""
    if not source:
        raise CloobError("no training data given (data.train is empty)",
                         "pass data.train=<folder or URL of webdataset shards>")
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
    return ShardSet(urls, counts)


def _read_count(tar_url: str) -> int | None:
    try:
        stats = Location(_stats_url(tar_url)).read_json()
        return None if stats is None else int(stats["successes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("unreadable stats file for %s (%s); treating the shard as unfinished", tar_url, e)
        return None
