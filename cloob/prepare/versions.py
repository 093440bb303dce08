"""Versions of a prepared dataset: a re-run reads its source again and fetches only the new rows.

Once a dataset's first preparation is complete (its manifest is written), every later run of
`cloob prepare` on that folder reads the source again, matches its rows with the rows already known,
and makes a new, immutable version when anything changed:

- a row is known by its identity (identity.py), which survives re-exports of the table: the spec's
  key column (`source.key`, for a table), YFCC's photo id, else the row's url and caption (with an
  occurrence number, so that a row listed twice is two rows). A known row keeps its row id wherever it now
  stands in the source; a new row gets the next free row id, in source order;
- the rows never given to img2dataset (new rows, and rows of a killed run) go into new shards after
  the last one (img2dataset's extend mode, as --retry-failed), and with --retry-failed the rows that
  failed are given again too;
- rows that are no longer in the source are not in the version: their samples stay in the shards
  (earlier versions hold them) and the version lists them (`excluded_keys`, the samples' keys), which
  the training reader skips (cloob.data.shards); `cloob prepare ... --purge-removed` (purge.py)
  deletes them from the shards for good.

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
from cloob.prepare.identity import (
    BATCH,
    KEY_SCHEMA,
    KEYS,
    as_u64,
    digest16,
    identity,
    key_array,
    known_keys,
    with_occurrence,
    write_parquet,
)
from cloob.prepare.manifest import build_manifest, finished_shards
from cloob.prepare.sources import iter_rows
from cloob.prepare.spec import Cc3mSource, PretrainSpec, TableSource, Yfcc15mSource
from cloob.storage import Location

VERSIONS = f"{META}/{VERSIONS_DIR}"
SOURCE_STATE = f"{META}/source.json"


def timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
                kbuf += digest16(identity(row))
                cbuf += digest16(f"{row['url']}\t{row['caption']}")
                for k in schema.names:
                    cols[k].append(row[k])
                if len(cols["url"]) >= BATCH:
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
    return tmp, with_occurrence(as_u64(kbuf)), as_u64(cbuf), counts


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
        known = known_keys(store)
        idx = pc.index_in(key_array(keys), value_set=known["key"])
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
            write_parquet(store, f"{KEYS}/{n_keys:03d}.parquet",
                           pa.table({"key": key_array(keys[fresh]), "row_id": pa.array(ids[fresh], pa.int64())},
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
    m.update({"version": version, "parent": version - 1, "created_at": timestamp(), "rows_added": added,
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


