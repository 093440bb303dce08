"""Versions of a prepared dataset: a re-run reads its source again and fetches only the new rows.

Once a dataset's first preparation is complete (its manifest is written), every later run of
`cloob prepare` on that folder reads the source again, matches its rows with the rows already known,
and makes a new, immutable version when anything changed:

- a row is known by its identity, which survives re-exports of the table: the spec's key column
  (`source.key`, for a table), YFCC's photo id, else the row's url and caption (with an occurrence
  number, so that a row listed twice is two rows). A known row keeps its row id wherever it now
  stands in the source; a new row gets the next free row id, in source order;
- the rows never given to img2dataset (new rows, and rows of a killed run) go into new shards after
  the last one (img2dataset's extend mode, as --retry-failed), and with --retry-failed the rows that
  failed are given again too;
- rows that are no longer in the source are not in the version: their samples stay in the shards
  (earlier versions hold them) and the version lists them (`excluded_keys`, the samples' keys), which
  the training reader skips (cloob.data.shards); `cloob prepare ... --purge-removed` deletes them
  from the shards for good.

An unchanged source (same identities, nothing left to fetch) is a no-op: "no new rows since version
N". When the source's files keep their size and modification time (or ETag) since the last read, the
re-read itself is skipped.

Layout in the dataset folder (beside run.py's):

    _cloob/versions/vN.json   version N's manifest: the manifest's fields (shards, totals, spec, rows,
                              history, content_hash) plus version, parent, created_at, rows_added,
                              rows_removed, removed_row_ids and excluded_keys. v1.json is the first
                              preparation's manifest as it was, copied when version 2 is made.
    _cloob/keys/NNN.parquet   row identities (16-byte digests) and the row ids given to them: 000 for
                              the first version's rows, one more file per version's new rows, written
                              before their download (so a killed run gives them the same ids again)
    _cloob/retry/NNN.parquet  the rows given to each extend round (new rows and retried ones)
    _cloob/source.json        the source files' sizes and times at the last read (the no-op shortcut)
    _cloob/manifest.json      the newest version's manifest. A dataset that never got a second
                              version keeps its manifest byte for byte (no version fields), and so
                              its content hash.

Every file is written whole (cloob.storage), vN.json before manifest.json, so a run killed anywhere
resumes: finished shards are kept, the rows not yet in any shard are fetched by the next run, and a
manifest behind the newest version is brought level.

The version's content hash is the manifest's (cloob.prepare.manifest.content_hash), with the rows'
digest taken over (row id, url, caption) of the version's rows in row-id order and the excluded
sample keys added where there are any.

Memory: the rows stream through a temporary parquet file; the matching keeps two 16-byte digests a
source row in numpy arrays (identity and content, no Python object a row) and sorts them. Measured
(bench/bench_versions.py --match-rows): see BENCHMARKS.md, "re-reading the source at scale"; it
peaked at 0.9 GB for 3 million rows (interpreter included), about 290 bytes a row: about 1 GB for
CC3M, 4 GB for YFCC15M. (Partitioning the digests by their first byte would bound it; not done.)

For the rest of the pipeline:

    versions(dataset_uri) -> list[dict]       the versions of a prepared dataset, oldest first
    source_unchanged(spec, dataset_uri)       whether a re-run would be a no-op, without reading the
                                              source (for the pipeline's "already done" key)
    resolve(data_train) -> dict               what `data.train` (a folder, `<folder>@vN`, a
                                              version's or manifest's URL) trains on: shards, counts,
                                              excluded keys, version, content_hash
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cloob.data.shards import VERSIONS_DIR, read_version_ref
from cloob.errors import CloobError
from cloob.prepare.folder import META, write_json
from cloob.prepare.manifest import build_manifest, finished_shards
from cloob.prepare.sources import iter_rows
from cloob.prepare.spec import Cc3mSource, PretrainSpec, TableSource, Yfcc15mSource
from cloob.storage import Location

VERSIONS = f"{META}/{VERSIONS_DIR}"
KEYS = f"{META}/keys"
SOURCE_STATE = f"{META}/source.json"
KEY_SCHEMA = pa.schema([("key", pa.binary(16)), ("row_id", pa.int64())])
_BATCH = 65536


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------- identities

def identity(row: dict) -> str:
    """What identifies a source row across re-exports: its declared key (a table's key column,
    YFCC's photo id), else its url and caption."""
    sk = row.get("source_key") or ""
    if sk.startswith(("key:", "photo:")):
        return sk
    return f"{row['url']}\t{row['caption']}"


def _digest16(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _as_u64(buf: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint64).reshape(-1, 2)  # no copy (the buffer is not resized after)


def _with_occurrence(keys: np.ndarray) -> np.ndarray:
    """The keys with each one's occurrence number (0 for its first place in the given order, 1 for
    the next, ...) mixed in: a row listed twice is two rows, matched in order."""
    n = len(keys)
    if n == 0:
        return keys
    order = np.lexsort((np.arange(n), keys[:, 1], keys[:, 0]))
    s = keys[order]
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (s[1:] != s[:-1]).any(axis=1)
    starts = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
    occ = np.empty(n, dtype=np.uint64)
    occ[order] = (np.arange(n) - starts).astype(np.uint64)
    out = keys.copy()
    with np.errstate(over="ignore"):
        out[:, 1] ^= occ * np.uint64(0x9E3779B97F4A7C15)
    return out


def _key_array(keys: np.ndarray) -> pa.Array:
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(keys), [None, pa.py_buffer(keys.tobytes())])


def _keys_of_rows_file(store: Location) -> pa.Table:
    """The first version's identities, from _cloob/rows.parquet (its rows in row-id order)."""
    buf, ids = bytearray(), []
    with store.open(f"{META}/rows.parquet", "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH, columns=["row_id", "url", "caption",
                                                                                "source_key"]):
            cols = [batch.column(c).to_pylist() for c in ("url", "caption", "source_key")]
            for url, caption, sk in zip(*cols):
                buf += _digest16(identity({"url": url, "caption": caption, "source_key": sk}))
            ids.append(batch.column("row_id"))
    row_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.int64())
    return pa.table({"key": _key_array(_with_occurrence(_as_u64(buf))), "row_id": row_ids}, schema=KEY_SCHEMA)


def _write_parquet(store: Location, rel: str, table: pa.Table) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=store.path(META) if store.is_local else None)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        store.move_in(tmp, rel)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _known_keys(store: Location) -> pa.Table:
    """Every identity given a row id so far (writing keys/000.parquet first for a dataset made before
    versions existed)."""
    store.refresh()
    names = sorted(store.glob(f"{KEYS}/*.parquet")) if store.exists(KEYS) else []
    if not names:
        _write_parquet(store, f"{KEYS}/000.parquet", _keys_of_rows_file(store))
        names = [f"{KEYS}/000.parquet"]
    tables = []
    for name in names:
        with store.open(name if name.startswith(META) else f"{KEYS}/{posixpath.basename(name)}", "rb") as f:
            tables.append(pq.read_table(f, schema=KEY_SCHEMA))
    return pa.concat_tables(tables)


# ----------------------------------------------------------------------------------- the source

def fingerprint(spec: PretrainSpec) -> list | None:
    """(file, size, modification time or ETag) of the source's files (for https://, the server's ETag
    or Last-Modified, one HEAD request), or None where that cannot be told (the demo's generated rows,
    a server that sends neither): then the source is read again."""
    import fsspec

    src = spec.source
    if isinstance(src, (TableSource, Cc3mSource)):
        paths = [src.path] if src.path else []
    elif isinstance(src, Yfcc15mSource):
        meta = src.metadata if isinstance(src.metadata, list) else [src.metadata]
        paths = [p for p in (src.subset, *meta) if p]
    else:
        return None
    out = []
    try:
        for p in paths:
            fs, path = fsspec.core.url_to_fs(p)
            fs.invalidate_cache()  # sizes and times as they are now, not as listed earlier in this process
            if any(ch in path for ch in "*?["):
                matched = sorted(fs.glob(path))
            else:
                matched = [path]
            for m in matched:
                info = fs.info(m)
                stamp = next((info[k] for k in ("ETag", "Last-Modified", "mtime", "LastModified", "last_modified")
                              if info.get(k)), None)
                if stamp is None:  # (an https:// file whose server sends neither ETag nor Last-Modified)
                    return None
                out.append([m, int(info.get("size") or 0), str(stamp)])
    except (OSError, ValueError, ImportError):
        return None
    return [spec.content_hash(locations=False), out]


def _read_source(spec: PretrainSpec, folder: str, progress: bool):
    """Stream the source's rows into a temporary parquet file (source order); returns (its path,
    identity keys (n, 2), content digests (n, 2), counts)."""
    from tqdm import tqdm

    counts: Counter = Counter()
    kbuf, cbuf = bytearray(), bytearray()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-source-", suffix=".parquet")
    os.close(fd)
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("source_key", pa.string())])
    cols: dict[str, list] = {k: [] for k in schema.names}
    bar = tqdm(desc=f"{spec.name}: reading the source again", unit=" rows", disable=not progress, leave=False)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in iter_rows(spec, counts, progress):
                kbuf += _digest16(identity(row))
                cbuf += _digest16(f"{row['url']}\t{row['caption']}")
                for k in schema.names:
                    cols[k].append(row[k])
                if len(cols["url"]) >= _BATCH:
                    writer.write_table(pa.table(cols, schema=schema))
                    for v in cols.values():
                        v.clear()
                bar.update()
            if cols["url"]:
                writer.write_table(pa.table(cols, schema=schema))
        if counts["kept"] == 0:  # an empty export is a broken one far more often than a takedown of every row
            raise CloobError(
                f"the source of {spec.name!r} gave no usable rows this time (read {counts['read']}, invalid URL "
                f"{counts['invalid_url']}, empty caption {counts['empty_caption']}); no version was made",
                "check the source file and its columns (url must be http(s), caption non-empty)")
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        bar.close()
    return tmp, _with_occurrence(_as_u64(kbuf)), _as_u64(cbuf), counts


def _shard_rows(store: Location, shards: dict[int, str]) -> tuple[np.ndarray, pa.Table]:
    """(every row id given to a finished shard, (row_id, key) of the samples that succeeded)."""
    attempted, ok = [], []
    for stem in shards.values():
        with store.open(f"{stem}.parquet", "rb") as f:
            t = pq.read_table(f, columns=["row_id", "key", "status"])
        attempted.append(t["row_id"].to_numpy(zero_copy_only=False))
        ok.append(t.filter(pc.equal(t["status"], "success")).select(["row_id", "key"]))
    ids = np.concatenate(attempted) if attempted else np.zeros(0, dtype=np.int64)
    good = pa.concat_tables(ok) if ok else pa.table({"row_id": pa.array([], pa.int64()), "key": pa.array([], pa.string())})
    return ids, good


# ------------------------------------------------------------------------------------ versions

def latest_version(store: Location) -> dict | None:
    """The newest version's manifest: the highest vN.json, else the folder's manifest (version 1)."""
    store.refresh()
    names = store.glob(f"{VERSIONS}/v*.json") if store.exists(VERSIONS) else []
    numbers = sorted(int(posixpath.basename(n)[1:-5]) for n in names if posixpath.basename(n)[1:-5].isdigit())
    if numbers:
        return store.read_json(f"{VERSIONS}/v{numbers[-1]}.json")
    m = store.read_json(f"{META}/manifest.json")
    return None if m is None else {**m, "version": m.get("version", 1)}


def _removed_counts(prev: dict, removed: np.ndarray) -> tuple[int, int]:
    before = set(prev.get("removed_row_ids") or [])
    now = set(removed.tolist())
    return len(now - before), len(before - now)


def next_version(store: Location, spec: PretrainSpec, spec_hash: str, *, retry_failed: bool, progress: bool,
                 run_round) -> dict:
    """Read the source again and make the next version if anything changed (see the module
    docstring); `run_round(url_list, rows, expect)` runs one img2dataset extend round. Returns the
    newest manifest plus `run`."""
    import time

    t0 = time.monotonic()
    prev = latest_version(store)
    assert prev is not None
    manifest = store.read_json(f"{META}/manifest.json")
    if manifest is None or manifest.get("content_hash") != prev.get("content_hash"):
        write_json(store, f"{META}/manifest.json", _as_manifest(prev))  # a kill between vN.json and it
    n_prev = int(prev.get("version", 1))
    fp = fingerprint(spec)
    state = store.read_json(SOURCE_STATE) if fp is not None else None
    if fp is not None and not retry_failed and state and state.get("fingerprint") == fp \
            and state.get("version") == n_prev:
        return _noop(prev, t0, f"no new rows since version {n_prev} (the source's files are unchanged)")

    folder = store.path(META) if store.is_local else None
    tmp, keys, content, counts = _read_source(spec, folder, progress)
    try:
        known = _known_keys(store)
        idx = pc.index_in(_key_array(keys), value_set=known["key"])
        matched = idx.is_valid().to_numpy(zero_copy_only=False)
        ids = np.full(len(keys), -1, dtype=np.int64)
        if matched.any():
            ids[matched] = known["row_id"].take(pc.drop_null(idx)).to_numpy(zero_copy_only=False)
        fresh = np.flatnonzero(~matched)
        known_ids = known["row_id"].to_numpy(zero_copy_only=False)
        first_new = int(known_ids.max()) + 1 if len(known_ids) else 0
        ids[fresh] = np.arange(first_new, first_new + len(fresh), dtype=np.int64)

        shards = finished_shards(store)
        attempted, good = _shard_rows(store, shards)
        pending = ~np.isin(ids, attempted)  # new rows, and rows of a killed run
        if retry_failed:
            ok_ids = good["row_id"].to_numpy(zero_copy_only=False)
            pending |= np.isin(ids, attempted) & ~np.isin(ids, ok_ids)
        removed = np.setdiff1d(known_ids, ids)
        gone, back = _removed_counts(prev, removed)
        if not pending.any() and not gone and not back:
            if fp is not None:
                write_json(store, SOURCE_STATE, {"fingerprint": fp, "version": n_prev})
            return _noop(prev, t0, f"no new rows since version {n_prev}")

        if len(fresh):  # their ids, before any of them can reach a shard
            store.refresh()
            n_keys = len(store.glob(f"{KEYS}/*.parquet"))
            _write_parquet(store, f"{KEYS}/{n_keys:03d}.parquet",
                           pa.table({"key": _key_array(keys[fresh]), "row_id": pa.array(ids[fresh], pa.int64())},
                                    schema=KEY_SCHEMA))
        rounds = []
        todo = np.flatnonzero(pending)
        if len(todo):
            from cloob.prepare.run import _remove_unfinished, _write_delta_rows

            _remove_unfinished(store, shards, from_id=max(shards, default=-1) + 1)
            url_list = _write_delta_rows(store, tmp, todo, ids)
            first = max(shards, default=-1) + 1
            expect = list(range(first, first + -(-len(todo) // spec.download.shard_size)))
            r = run_round(url_list, len(todo), expect)
            r["mode"] = "new-rows" if (~np.isin(ids[todo], attempted)).any() else "retry-failed"
            rounds.append(r)
            shards = finished_shards(store)
            attempted, good = _shard_rows(store, shards)
    finally:
        os.unlink(tmp)

    order = np.argsort(ids, kind="stable")
    digest = hashlib.sha256(ids[order].astype("<i8").tobytes() + content[order].astype("<u8").tobytes())
    rows = {"spec_hash": spec_hash, "sha256": digest.hexdigest(), "read": counts["read"], "kept": counts["kept"],
            "invalid_url": counts["invalid_url"], "empty_caption": counts["empty_caption"]}
    history = list(prev.get("history") or []) + rounds
    m = build_manifest(store, META, spec=spec, spec_hash=spec_hash, rows=rows, history=history, progress=progress)
    gone_ok = good.filter(pc.invert(pc.is_in(good["row_id"], value_set=pa.array(ids))))
    excluded = sorted(gone_ok["key"].to_pylist())
    prev_last = prev.get("last_row_id")
    if prev_last is None:  # version 1: the first keys file holds its rows
        with store.open(f"{KEYS}/000.parquet", "rb") as f:
            prev_last = int(pc.max(pq.read_table(f, columns=["row_id"])["row_id"]).as_py())
    added = int((ids > prev_last).sum())
    from cloob.prepare.manifest import row_outcomes

    ok_ids, fails = row_outcomes(store, finished_shards(store))
    left_out = set(removed.tolist())  # rows no longer in the source count neither way
    fails = {rid: why for rid, why in fails.items() if rid not in left_out}
    m = _versioned(m, version=n_prev + 1, excluded=excluded, removed=removed, added=added, gone=gone, back=back,
                   ok_in_version=len(ok_ids - left_out), fails=fails, last_row_id=int(max(ids.max(), prev_last)))
    if n_prev == 1 and not store.exists(f"{VERSIONS}/v1.json"):
        write_json(store, f"{VERSIONS}/v1.json", {**_as_manifest(prev), "version": 1})
    write_json(store, f"{VERSIONS}/v{n_prev + 1}.json", m)
    write_json(store, f"{META}/manifest.json", m)
    if fp is not None:
        write_json(store, SOURCE_STATE, {"fingerprint": fp, "version": n_prev + 1})
    return {**m, "run": {"seconds": round(time.monotonic() - t0, 2), "rounds": rounds, "noop": False,
                         "message": _summary(m)}}


def _as_manifest(v: dict) -> dict:
    """A version's manifest as the folder's manifest.json holds it (version 1: without the field)."""
    return {k: val for k, val in v.items() if not (k == "version" and val == 1 and "parent" not in v)}


def _versioned(m: dict, *, version: int, excluded: list[str], removed: np.ndarray, added: int, gone: int,
               back: int, ok_in_version: int, fails: dict[int, str], last_row_id: int) -> dict:
    """The manifest `m` (of every shard) as version `version`'s: its totals over the version's rows."""
    from cloob.prepare.manifest import content_hash

    t = m["totals"]
    t["successes"], t["failures"] = ok_in_version, len(fails)
    t["attempted"] = attempted = ok_in_version + len(fails)
    t["failures_by_reason"] = dict(Counter(fails.values()).most_common())
    t["samples"] = t["samples"] - len(excluded)
    t["success_rate"] = round(ok_in_version / attempted, 6) if attempted else 0.0
    m.update({"version": version, "parent": version - 1, "created_at": _now(), "rows_added": added,
              "rows_removed": gone, "rows_restored": back, "last_row_id": last_row_id, "removed_row_ids": removed.tolist(),
              "excluded_keys": excluded})
    m["content_hash"] = content_hash(m)
    return m


def _summary(m: dict) -> str:
    back = f", {m['rows_restored']} back" if m.get("rows_restored") else ""
    return (f"version {m['version']}: {m['rows_added']} new rows, {m['rows_removed']} removed{back}; "
            f"{m['totals']['samples']} samples")


def _noop(prev: dict, t0: float, why: str) -> dict:
    import time

    return {**_as_manifest(prev), "run": {"seconds": round(time.monotonic() - t0, 2), "rounds": [], "noop": True,
                                          "message": f"nothing to do: {why}"}}


# ---------------------------------------------------------------------------- for the pipeline

def versions(dataset_uri: str) -> list[dict]:
    """The versions of the dataset prepared at `dataset_uri`, oldest first: for each, version,
    created_at (None for a first version made before versions existed), rows, rows_added,
    rows_removed, samples, shards, content_hash and url (what `data.train` takes to train on exactly
    that version: `<dataset_uri>@vN`). [] where no preparation has finished there."""
    store = Location(dataset_uri)
    newest = latest_version(store)
    if newest is None:
        return []
    out = []
    for n in range(1, int(newest.get("version", 1)) + 1):
        v = newest if n == newest.get("version", 1) else store.read_json(f"{VERSIONS}/v{n}.json")
        if v is None:
            continue
        t = v["totals"]
        out.append({"version": n, "created_at": v.get("created_at") or v.get("updated_at"), "rows": t["rows"],
                    "rows_added": v.get("rows_added", t["rows"]), "rows_removed": v.get("rows_removed", 0),
                    "samples": t["samples"], "shards": t["shards"], "content_hash": v["content_hash"],
                    "url": f"{dataset_uri.rstrip('/')}@v{n}"})
    return out


def source_unchanged(spec: PretrainSpec, dataset_uri: str) -> bool:
    """Whether the source's files are as they were when the newest version of the dataset at
    `dataset_uri` read them (size and modification time or ETag, without reading them): a re-run of
    `cloob prepare` would be a no-op. False where that cannot be told (the demo's generated rows, a
    dataset not prepared yet): then run it, it says whether anything is new."""
    store = Location(dataset_uri)
    newest = latest_version(store)
    fp = fingerprint(spec)
    if newest is None or fp is None:
        return False
    state = store.read_json(SOURCE_STATE) or {}
    return state.get("fingerprint") == fp and state.get("version") == int(newest.get("version", 1))


def resolve(data_train: str) -> dict:
    """What `data.train` trains on: a dataset folder (its newest version), `<folder>@vN` (version N),
    or the URL of a version's JSON (`<folder>/_cloob/versions/vN.json`) or of the folder's manifest.

    Returns {"folder", "version", "content_hash", "shards" (URLs), "counts" (samples per shard, as
    its stats file says), "exclude_keys" (sample keys the reader skips: rows removed from the source),
    "num_samples", "manifest_url"}; version and content_hash are None for shards that cloob prepare
    did not make (a plain folder of tars, a brace pattern, a glob). The same function the training
    reader uses (cloob.data.shards.list_shards), so the plan and the reader agree; it needs no
    cloob.prepare import on a training node."""
    from cloob.data.shards import list_shards

    ref = read_version_ref(data_train)
    s = list_shards(data_train)
    folder = ref.folder if ref else (data_train.rstrip("/") if s.version is not None else None)
    manifest_url = ref.manifest_url if ref else (Location(folder).url(f"{META}/manifest.json") if folder else None)
    return {"folder": folder, "version": s.version, "content_hash": s.content_hash,
            "shards": s.urls, "counts": s.counts, "exclude_keys": sorted(s.exclude_keys),
            "num_samples": s.num_samples, "manifest_url": manifest_url}


# ------------------------------------------------------------------------------ purging removed rows

def purge_removed(out: str, progress: bool = False) -> dict:
    """Delete from the shards, for good, the samples of rows that the newest version no longer has
    (taken down at the source). Each shard that holds any is rewritten without them (tar, then its
    parquet, where their status becomes "purged", then its stats file), and every version's JSON
    has its shard entries, counts and excluded keys brought level and the purge recorded under
    `purged`; a version's content_hash stays, naming the version as it was prepared. Versions that
    left the rows out read exactly what they read before; earlier ones read the rest of their
    samples. Safe to rerun after a kill: a shard holding none of them is left as it is."""
    from tqdm import tqdm

    from cloob.lock import folder_lock

    store = Location(out)
    with folder_lock(store.url(META), purpose="cloob prepare --purge-removed", alternative="wait for it to end",
                     label=store.url()):
        newest = latest_version(store)
        if newest is None:
            return {"samples": 0, "shards": 0, "rows": 0}
        removed = pa.array(newest.get("removed_row_ids") or [], pa.int64())
        shards = finished_shards(store)
        parts = []
        for stem in shards.values():  # the rows' samples, purged already by a killed run or not
            with store.open(f"{stem}.parquet", "rb") as f:
                t = pq.read_table(f, columns=["row_id", "key", "status"])
            parts.append(t.filter(pc.and_(pc.is_in(t["row_id"], value_set=removed),
                                          pc.is_in(t["status"], value_set=pa.array(["success", "purged"])))))
        gone = pa.concat_tables(parts) if parts else pa.table({"row_id": pa.array([], pa.int64()),
                                                               "key": pa.array([], pa.string())})
        keys = set(gone["key"].to_pylist())
        touched: dict[str, int] = {}
        for stem in tqdm(shards.values(), desc="purging", unit="shard", disable=not progress, leave=False):
            n = _purge_shard(store, stem, keys)
            if n:
                touched[f"{stem}.tar"] = n
        # Every version's shard entries against the stats files (also those a killed purge left behind).
        _purge_versions(store, keys, shards, sorted(set(gone["row_id"].to_pylist())))
        if not touched:
            return {"samples": 0, "shards": 0, "rows": 0}
        return {"samples": sum(touched.values()), "shards": len(touched),
                "rows": len(set(gone["row_id"].to_pylist()))}


def _purge_shard(store: Location, stem: str, keys: set[str]) -> int:
    """Rewrite shard `stem` without the samples `keys` (tar, then parquet, then stats); how many samples
    it lost (0: untouched). A shard that a killed purge left with a stale stats file is levelled."""
    import io
    import tarfile

    with store.open(f"{stem}.parquet", "rb") as f:
        table = pq.read_table(f)
    hit = pc.and_(pc.is_in(table["key"], value_set=pa.array(sorted(keys), pa.string())),
                  pc.equal(table["status"], "success"))
    n = int(pc.sum(hit).as_py() or 0)
    if n:
        folder = store.path(META) if store.is_local else None
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-purge-", suffix=".tar")
        os.close(fd)
        try:
            with store.open(f"{stem}.tar", "rb") as src, tarfile.open(fileobj=src, mode="r|") as tin, \
                    tarfile.open(tmp, "w") as tout:
                for member in tin:
                    if member.name.rsplit(".", 1)[0] in keys:
                        continue
                    data = tin.extractfile(member).read() if member.isfile() else None
                    tout.addfile(member, io.BytesIO(data) if data is not None else None)
            store.move_in(tmp, f"{stem}.tar")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        status = pc.if_else(hit, "purged", table["status"])
        message = pc.if_else(hit, "removed from the source; purged", table["error_message"])
        table = table.set_column(table.schema.get_field_index("status"), "status", status)
        table = table.set_column(table.schema.get_field_index("error_message"), "error_message", message)
        _write_parquet(store, f"{stem}.parquet", table)
    return _level_stats(store, stem, int(pc.sum(pc.equal(table["status"], "success")).as_py() or 0))


def _level_stats(store: Location, stem: str, successes: int) -> int:
    """Set the shard's stats file to `successes` (written last, as img2dataset does); how many fewer."""
    import json

    stats = json.loads(store.read_bytes(f"{stem}_stats.json"))
    fewer = int(stats["successes"]) - successes
    if fewer:
        stats["successes"] = successes
        store.write_bytes(f"{stem}_stats.json", json.dumps(stats, indent=4).encode())
    return fewer


def _purge_versions(store: Location, keys: set[str], shards: dict[int, str], row_ids: list[int]) -> None:
    """Bring every version's shard entries level with the shards' stats files after a purge."""
    import json

    from cloob.prepare.manifest import _cached_digest

    now = {f"{stem}.tar": int(json.loads(store.read_bytes(f"{stem}_stats.json"))["successes"])
           for stem in shards.values()}
    digests: dict[str, dict] = {}
    record = {"at": _now(), "row_ids": row_ids, "samples": len(keys)}
    names = sorted(store.glob(f"{VERSIONS}/v*.json"))
    targets = [f"{VERSIONS}/{posixpath.basename(n)}" for n in names] + [f"{META}/manifest.json"]
    for rel in targets:
        v = store.read_json(rel)
        if v is None:
            continue
        dropped = 0
        for e in v["shards"]:
            ok = now.get(e["shard"])
            if ok is not None and ok != int(e["successes"]):
                if e["shard"] not in digests:
                    digests[e["shard"]] = _cached_digest(store, META, e["shard"][:-4])
                d = digests[e["shard"]]
                dropped += int(e["successes"]) - ok
                e.update({"successes": ok, "samples": d["samples"], "bytes": d["bytes"], "sha256": d["sha256"],
                          "content_sha256": d["content_sha256"]})
        if not dropped:
            continue
        excluded = v.get("excluded_keys")
        if excluded is not None:
            was = len(excluded)
            v["excluded_keys"] = [k for k in excluded if k not in keys]
            still_in = dropped - (was - len(v["excluded_keys"]))  # samples this version read until now
        else:
            still_in = dropped
        t = v["totals"]
        t["samples"] -= still_in
        t["successes"] -= still_in
        t["bytes"] = sum(e["bytes"] for e in v["shards"])
        v["purged"] = [*v.get("purged", []), record]
        write_json(store, rel, v)
