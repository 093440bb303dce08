"""The dataset manifest: what exactly is in a prepared dataset's shards.

Built from img2dataset's own outputs: a shard counts only once its NNNNN_stats.json exists (written
last); per-row outcomes come from its NNNNN.parquet. A row retried into a later shard counts once:
as a success if any attempt succeeded, else with the reason of its last attempt.

Each shard has two digests: `sha256` of the tar file (integrity: what a reader must find) and
`content_sha256`, a digest of its samples independent of member order and tar timestamps
(img2dataset writes samples as their downloads finish, so two runs over the same rows give different
files with the same samples). The manifest's `content_hash` covers the spec, the rows and every
shard's content digest: equal hashes mean equal datasets, however they were downloaded. The spec
enters it without its source's locations (PretrainSpec.content_hash(locations=False)): the rows'
digest stands for what was read, so the same rows from another path, name, compression or YFCC
metadata form give the same hash (manifest_version 2; version 1 hashed the spec with them).

The dataset folder is a cloob.storage.Location (a local folder or an object-store prefix); paths
are relative to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cloob.safetext import safe_text
from cloob.storage import Location

MANIFEST_VERSION = 2
_STATS = re.compile(r"^(\d+)_stats\.json$")
_URL = re.compile(r"https?://\S+")


def tool_versions() -> dict[str, str]:
    from cloob.version import code_version

    out = {"cloob": code_version()}
    for pkg in ("img2dataset", "webdataset", "pyarrow", "fsspec", "s3fs"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def finished_shards(store: Location) -> dict[int, str]:
    """{shard id: shard name stem} for every shard whose stats file exists."""
    out = {}
    for name in store.glob("*_stats.json"):
        m = _STATS.match(name)
        if m:
            out[int(m.group(1))] = m.group(1)
    return dict(sorted(out.items()))


def reason_of(message: str | None) -> str:
    """A failure message with its URL left out, so that equal causes count together, and its control
    characters escaped: a server's HTTP reason phrase is in it as sent, escape sequences and all."""
    msg = _unescaped_reason(message)
    if msg is None:
        return "unknown"
    return safe_text(msg, limit=len(msg))  # cut first: the same 160 characters as before, escaped


def _unescaped_reason(message: str | None) -> str | None:
    """reason_of(message) before its escaping; None where it is "unknown"."""
    if not message:
        return None
    return _URL.sub("<url>", str(message)).strip()[:160]


class _HashingReader(io.RawIOBase):
    """Feeds every byte read through sha256 (tarfile reads the stream once, front to back)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        self.h.update(data)
        self.n += len(data)
        b[: len(data)] = data
        return len(data)


def _digest_tarfile(store: Location, tar: str) -> dict:
    """shard_digest through the tarfile module: any tar, slower (a Python object per member)."""
    with store.open(tar, "rb") as f:
        r = _HashingReader(f)
        members: dict[str, str] = {}
        with tarfile.open(fileobj=io.BufferedReader(r, 1 << 20), mode="r|") as tar:
            for m in tar:
                if m.isfile():
                    members[m.name] = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
        while r.readinto(bytearray(1 << 20)):  # the tar's end padding counts in the file hash
            pass
    return _digest_result(r.n, r.h.hexdigest(), members)


def _digest_result(n: int, sha256: str, members: dict[str, str]) -> dict:
    content = hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in sorted(members.items())).encode())
    samples = len({k.rsplit(".", 1)[0] for k in members})
    return {"bytes": n, "sha256": sha256, "content_sha256": content.hexdigest(), "samples": samples}


class _NotPlainUstar(Exception):
    pass


def _digest_ustar(store: Location, tar: str) -> dict:
    """shard_digest for the plain ustar files img2dataset writes (short names, regular files):
    headers parsed directly, ~5x faster than tarfile. Anything else raises _NotPlainUstar."""
    h, n, members, pax = hashlib.sha256(), 0, {}, {}
    with store.open(tar, "rb") as raw:
        f = io.BufferedReader(raw, 1 << 20) if not isinstance(raw, io.BufferedReader) else raw
        while True:
            header = f.read(512)
            h.update(header)
            n += len(header)
            if len(header) < 512:
                if header:
                    raise _NotPlainUstar("truncated header")
                break
            if header == b"\0" * 512:  # end-of-archive blocks, then padding: hash the rest
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
                break
            kind = header[156:157]
            if kind not in (b"0", b"\0", b"5", b"x") or header[345:500].strip(b"\0"):
                raise _NotPlainUstar(f"member type {kind!r} or a long name")
            name = header[:100].split(b"\0", 1)[0].decode()
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            if pax:  # the previous pax header's records override this member's fields
                name, size = pax.get("path", name), int(pax.get("size", size))
                pax = {}
            padded = -(-size // 512) * 512
            data = f.read(padded)
            if len(data) < padded:
                raise _NotPlainUstar("truncated member")
            h.update(data)
            n += padded
            if kind == b"x":  # records "<len> <key>=<value>\n" (tarfile writes one for a float mtime)
                for rec in bytes(data[:size]).decode().splitlines():
                    key, _, value = rec.partition(" ")[2].partition("=")
                    pax[key] = value
            elif kind != b"5":
                members[name] = hashlib.sha256(memoryview(data)[:size]).hexdigest()
    return _digest_result(n, h.hexdigest(), members)


def shard_digest(store: Location, tar: str) -> dict:
    """bytes, sha256 and order-independent content_sha256 of the tar at `tar`, in a single read."""
    try:
        return _digest_ustar(store, tar)
    except (_NotPlainUstar, ValueError, UnicodeDecodeError):
        return _digest_tarfile(store, tar)


def _cached_digest(store: Location, meta: str, stem: str) -> dict:
    """The shard's digest, read back from `<meta>/digests/` while the tar keeps its size."""
    tar, rel = f"{stem}.tar", posixpath.join(meta, "digests", f"{stem}.json")
    size = store.size(tar)
    try:
        d = store.read_json(rel)
        if d is not None and d.get("bytes") == size:
            return d
    except ValueError:
        pass
    d = shard_digest(store, tar)
    store.write_json(rel, d)
    return d


@dataclass(frozen=True)
class RowOutcomes:
    """Every row id's outcome over the finished shards, as arrays (no Python object a row): a row
    retried into a later shard counts once, as a success if any attempt succeeded, else with the
    reason of its last attempt."""

    succeeded: np.ndarray  # bool, one a row id (its index): succeeded in some shard
    failed: np.ndarray  # int64, unique: the ids that never succeeded, in the order of their first failure
    codes: np.ndarray  # int32, one a failed id: its last failure's reason, an index into `reasons`
    reasons: list[str]  # reason_of() of the failure messages, in the order first met

    @property
    def n_ok(self) -> int:
        return int(np.count_nonzero(self.succeeded))

    def ok_ids(self) -> np.ndarray:
        """The ids that succeeded, sorted (int64)."""
        return np.flatnonzero(self.succeeded).astype(np.int64, copy=False)

    def without(self, ids: np.ndarray) -> RowOutcomes:
        """These outcomes less the row ids `ids` (rows no longer in the source count neither way)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return self
        succeeded = self.succeeded.copy()
        succeeded[ids[(ids >= 0) & (ids < len(succeeded))]] = False
        keep = ~_member(self.failed, ids)
        return RowOutcomes(succeeded, self.failed[keep], self.codes[keep], self.reasons)

    def by_reason(self) -> dict[str, int]:
        """{reason: failed rows}, most first; ties in the order of the failed rows (what
        Counter(reason of each failed row, in first-failure order).most_common() gives)."""
        if not len(self.codes):
            return {}
        present, first = np.unique(self.codes, return_index=True)
        counts = np.bincount(self.codes, minlength=len(self.reasons))
        order = present[np.argsort(first)]
        return dict(Counter({self.reasons[c]: int(counts[c]) for c in order}).most_common())


def _member(a: np.ndarray, sorted_b: np.ndarray) -> np.ndarray:
    """a's elements that are in `sorted_b` (sorted, unique), as a mask."""
    if not len(sorted_b) or not len(a):
        return np.zeros(len(a), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_b, a), len(sorted_b) - 1)
    return sorted_b[i] == a


class _Reasons:
    """reason_of() of failure messages as small integer codes: `codes` {reason: code}, in the order
    first met; the escaping (a Python step a character) done once a distinct reason, not a message."""

    def __init__(self):
        self.codes: dict[str, int] = {}
        self._by_message: dict[str | None, int] = {}  # reason_of before its escaping -> code

    def code(self, message: str | None) -> int:
        key = _unescaped_reason(message)
        c = self._by_message.get(key)
        if c is None:
            c = self._by_message[key] = self.codes.setdefault(reason_of(message), len(self.codes))
        return c

    def of_column(self, messages: pa.ChunkedArray) -> np.ndarray:
        """The code of each message (int32), the URL left out once a distinct message."""
        if pa.types.is_null(messages.type) or not len(messages):
            return np.full(len(messages), self.code(None), dtype=np.int32)
        enc = pc.dictionary_encode(messages.combine_chunks())
        lut = np.array([self.code(m) for m in enc.dictionary.to_pylist()] + [self.code(None)], dtype=np.int32)
        return lut[pc.fill_null(enc.indices, len(enc.dictionary)).to_numpy(zero_copy_only=False)]


def read_outcomes(store: Location, shards: dict[int, str]) -> RowOutcomes:
    """The row outcomes of the finished shards `shards` ({id: stem}, in shard order), read column by
    column from each shard's parquet file into arrays indexed by row id (row ids are small
    non-negative integers, as matching.shard_flags takes them): a flag, the last failure's reason
    code and the first failure's rank, 9 bytes a row id whatever the number of shards."""
    reasons = _Reasons()
    ok = np.zeros(0, dtype=bool)
    last = np.zeros(0, dtype=np.int32)  # the reason code of each id's last failure
    rank = np.zeros(0, dtype=np.int32)  # the rank of each id's first failure among all failures; -1: none
    ranked = 0
    for stem in shards.values():
        with store.open(f"{stem}.parquet", "rb") as f:
            t = pq.read_table(f, columns=["row_id", "status", "error_message"])
        ids = pc.cast(t["row_id"], pa.int64()).to_numpy()
        if len(ids) and ids.min() < 0:
            raise ValueError(f"{stem}.parquet has a negative row_id")
        good = pc.fill_null(pc.equal(t["status"], "success"), False)
        codes = reasons.of_column(t["error_message"].filter(pc.invert(good)))
        mask = good.to_numpy(zero_copy_only=False).astype(bool, copy=False)
        del t, good
        if len(ids) and ids.max() >= len(ok):
            size = max(int(ids.max()) + 1, len(ok) + len(ok) // 4)
            ok = np.concatenate([ok, np.zeros(size - len(ok), dtype=bool)])
            last = np.concatenate([last, np.zeros(size - len(last), dtype=np.int32)])
            rank = np.concatenate([rank, np.full(size - len(rank), -1, dtype=rank.dtype)])
        ok[ids[mask]] = True
        fid = ids[~mask]
        if not len(fid):
            continue
        if ranked + len(fid) > np.iinfo(rank.dtype).max:
            rank = rank.astype(np.int64)
        # a row id twice in one shard: its first failure ranks it, its last gives the reason
        uid, first = np.unique(fid, return_index=True)
        final = len(fid) - 1 - np.unique(fid[::-1], return_index=True)[1]
        fresh = rank[uid] < 0
        rank[uid[fresh]] = ranked + first[fresh]
        last[uid] = codes[final]
        ranked += len(fid)
    failed = np.flatnonzero((rank >= 0) & ~ok)
    failed = failed[np.argsort(rank[failed])].astype(np.int64, copy=False)
    return RowOutcomes(ok, failed, last[failed], list(reasons.codes))


def row_outcomes(store: Location, shards: dict[int, str]):
    """(set of ids that succeeded, {failed id: last reason}) over all finished shards, in shard order:
    read_outcomes as Python objects, for small folders (about 100 bytes a row)."""
    r = read_outcomes(store, shards)
    return set(r.ok_ids().tolist()), {rid: r.reasons[c] for rid, c in zip(r.failed.tolist(), r.codes.tolist())}


def build_manifest(store: Location, meta: str, *, spec, spec_hash: str, rows: dict, history: list[dict],
                   progress: bool = False) -> dict:
    """The manifest of the dataset at `store`; shard digests are cached under `meta` (relative)."""
    from tqdm import tqdm

    shards = finished_shards(store)
    entries = []
    for _sid, stem in tqdm(shards.items(), desc="hashing shards", unit="shard", disable=not progress,
                          leave=False):
        stats = json.loads(store.read_bytes(f"{stem}_stats.json"))
        d = _cached_digest(store, meta, stem)
        entries.append({"shard": f"{stem}.tar", "successes": int(stats["successes"]), "attempted":
                        int(stats["count"]), "samples": d["samples"], "bytes": d["bytes"],
                        "sha256": d["sha256"], "content_sha256": d["content_sha256"]})
    out = read_outcomes(store, shards)
    ok, fails = out.n_ok, len(out.failed)
    attempted = ok + fails
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "name": spec.name,
        "spec_hash": spec_hash,
        "spec": spec.model_dump(mode="json"),
        "rows": rows,
        "shards": entries,
        "totals": {
            "rows": rows["kept"],
            "attempted": attempted,
            "successes": ok,
            "failures": fails,
            "success_rate": round(ok / attempted, 6) if attempted else 0.0,
            "failures_by_reason": out.by_reason(),
            "shards": len(entries),
            "samples": sum(e["samples"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
        },
        "tools": tool_versions(),
        "history": history,
    }
    manifest["content_hash"] = content_hash(manifest)
    return manifest


def content_hash(manifest: dict) -> str:
    """Hash of what the dataset holds: the spec without its source's locations, the rows, and each
    shard's name, count and content digest."""
    from cloob.prepare.spec import PretrainSpec

    spec = PretrainSpec.model_validate(manifest["spec"]).content_hash(locations=False)
    key = {"spec_hash": spec, "rows_sha256": manifest["rows"]["sha256"],
           "shards": [(e["shard"], e["successes"], e["content_sha256"]) for e in manifest["shards"]]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

