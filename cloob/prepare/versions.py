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

Memory: bounded, whatever the number of rows. The rows stream through a temporary parquet file, and
the matching (cloob.prepare.matching) goes through partitions of the identities and buckets by
position and by row id, temporary files on local disk, one at a time (PARTITION_ROWS rows each, plus
a byte a row id for each of three flags). Measured 2026-12-07 on a 2-core, 23.5 GiB machine
(bench/bench_versions.py --match-rows 1000000,3000000,10000000; BENCHMARKS.md, "re-reading the
source at scale"): a peak of 314, 333 and 347 MB for 1, 3 and 10 million rows (identities of version
1, re-read, match and digest, the interpreter included), where the whole-table match, every row's
digests in memory, peaked at 459 and 1047 MB for 1 and 3 million (about 290 bytes a row: 4 GB for
YFCC15M), in about the same time (3 million rows: 63 s against 64-67 s). The row outcomes that
build_manifest, the version's totals and a retry round count (manifest.read_outcomes) are numpy
arrays indexed by row id, 9 bytes a row id (a success flag, the last failure's reason code, the first
failure's rank), the shards' parquet files read column by column: measured the same day
(bench/bench_versions.py --outcome-rows 1000000,3000000,10000000; BENCHMARKS.md, "Row outcomes at
scale"), a peak 43, 65 and 128 MB above the process's before the call for 1, 3 and 10 million rows
(13 bytes a row at 10 million: 0.2 GB for YFCC15M), where the Python set and dict a row they replaced
took 103, 255 and 915 MB (about 90 bytes a row: 1.4 GB for YFCC15M), in a third of the time.

For the rest of the pipeline:

    versions(dataset_uri) -> list[dict]       the versions of a prepared dataset, oldest first
    source_unchanged(spec, dataset_uri)       whether a re-run would be a no-op, without reading the
                                              source (for the pipeline's "already done" key)
    resolve(data_train) -> dict               what `data.train` (a folder, `<folder>@vN`, a
                                              version's or manifest's URL) trains on: shards, counts,
                                              excluded keys, version, content_hash
"""

from __future__ import annotations

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
from cloob.prepare.folder import META, Damaged, read_json, write_json
from cloob.prepare.identity import BATCH, KEYS, digest16, identity
from cloob.prepare.manifest import RowOutcomes, build_manifest, finished_shards
from cloob.prepare.matching import Match, fixed16, shard_flags
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
    """Stream the source's rows into a temporary parquet file (source order, BATCH rows a row group),
    each with its identity's and its content's 16-byte digests (`key`, `content`); returns (its path,
    its number of rows, counts)."""
    from tqdm import tqdm

    counts: Counter = Counter()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-source-", suffix=".parquet")
    os.close(fd)
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("source_key", pa.string()),
                        ("key", pa.binary(16)), ("content", pa.binary(16))])
    cols: dict[str, list] = {k: [] for k in schema.names[:3]}
    kbuf, cbuf, n = bytearray(), bytearray(), 0
    bar = tqdm(desc=f"{spec.name}: reading the source again", unit=" rows", disable=not progress, leave=False)

    def flush(writer) -> None:
        writer.write_table(pa.table({**cols, "key": fixed16(kbuf), "content": fixed16(cbuf)}, schema=schema))
        for v in (*cols.values(), kbuf, cbuf):
            v.clear()

    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in iter_rows(spec, counts, progress):
                kbuf += digest16(identity(row))
                cbuf += digest16(f"{row['url']}\t{row['caption']}")
                for k in cols:
                    cols[k].append(row[k])
                n += 1
                if len(cols["url"]) >= BATCH:
                    flush(writer)
                bar.update()
            if cols["url"]:
                flush(writer)
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
    return tmp, n, counts


# ------------------------------------------------------------------------------------ versions

RESTORE_NEWEST = ("`cloob prepare` on this folder restores the newest version's file from its copy "
                  "(_cloob/manifest.json) and the manifest from the newest version's file; an older version's "
                  "file has no copy: restore it from a backup")


def latest_version(store: Location, *, repair: bool = False) -> dict | None:
    """The newest version's manifest: the highest vN.json, else the folder's manifest (version 1).

    A damaged file is an error naming it (folder.Damaged), unless `repair` (cloob prepare, which holds
    the folder's lock): the newest vN.json and manifest.json are written with the same content, so
    either restores the other, and the repair is said on stderr. Nothing is guessed beyond that."""
    import sys

    store.refresh()
    names = store.glob(f"{VERSIONS}/v*.json") if store.exists(VERSIONS) else []
    numbers = sorted(int(posixpath.basename(n)[1:-5]) for n in names if posixpath.basename(n)[1:-5].isdigit())
    manifest_rel = f"{META}/manifest.json"
    if numbers:
        newest = f"{VERSIONS}/v{numbers[-1]}.json"
        try:
            return read_json(store, newest, RESTORE_NEWEST)
        except Damaged:
            copy = parsed_or_none(store, manifest_rel)
            if not repair or copy is None or int(copy.get("version", 1)) != numbers[-1]:
                raise
            write_json(store, newest, copy)
            print(f"{store.url(newest)} was damaged: restored from its copy, {manifest_rel}", file=sys.stderr)
            return copy
    try:
        m = read_json(store, manifest_rel, RESTORE_NEWEST)
    except Damaged:
        if not repair:
            raise
        # One version only: the manifest is derived from the shards and the rows file, and is made
        # again as after a kill before it was written.
        print(f"{store.url(manifest_rel)} was damaged: it is made again from the shards", file=sys.stderr)
        store.remove(manifest_rel)
        return None
    return None if m is None else {**m, "version": m.get("version", 1)}


def parsed_or_none(store: Location, rel: str) -> dict | None:
    """The file parsed, or None where it is absent or damaged."""
    try:
        return store.read_json(rel)
    except ValueError:
        return None


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
    prev = latest_version(store, repair=True)
    assert prev is not None
    manifest = parsed_or_none(store, f"{META}/manifest.json")
    if manifest is None or manifest.get("content_hash") != prev.get("content_hash"):
        if store.exists(f"{META}/manifest.json"):
            import sys

            print(f"{store.url(META + '/manifest.json')} was behind or damaged: restored from version {prev.get('version', 1)}",
                  file=sys.stderr)
        write_json(store, f"{META}/manifest.json", _as_manifest(prev))  # a kill between vN.json and it
    n_prev = int(prev.get("version", 1))
    fp = fingerprint(spec)
    state = store.read_json(SOURCE_STATE) if fp is not None else None
    if fp is not None and not retry_failed and state and state.get("fingerprint") == fp \
            and state.get("version") == n_prev:
        return _noop(prev, t0, f"no new rows since version {n_prev} (the source's files are unchanged)")

    folder = store.path(META) if store.is_local else None
    tmp, n, counts = _read_source(spec, folder, progress)
    try:
        with Match(store, tmp, n, folder) as match:
            shards = finished_shards(store)
            tried, ok = shard_flags(store, shards)
            match.run(tried, ok, retry_failed)  # pending: new rows, rows of a killed run (and failed ones)
            removed = match.removed
            gone, back = _removed_counts(prev, removed)
            if not match.n_pending and not gone and not back:
                if fp is not None:
                    write_json(store, SOURCE_STATE, {"fingerprint": fp, "version": n_prev})
                return _noop(prev, t0, f"no new rows since version {n_prev}")

            if match.n_fresh:  # their ids, before any of them can reach a shard
                store.refresh()
                n_keys = len(store.glob(f"{KEYS}/*.parquet"))
                store.move_in(match.fresh_file, f"{KEYS}/{n_keys:03d}.parquet")
            rounds = []
            if match.n_pending:
                from cloob.prepare.folder import next_retry_file
                from cloob.prepare.run import _remove_unfinished

                _remove_unfinished(store, shards, from_id=max(shards, default=-1) + 1)
                url_list = next_retry_file(store)
                store.move_in(match.delta_file, url_list)
                first = max(shards, default=-1) + 1
                expect = list(range(first, first + -(-match.n_pending // spec.download.shard_size)))
                r = run_round(url_list, match.n_pending, expect)
                r["mode"] = "new-rows" if match.new_rows else "retry-failed"
                rounds.append(r)
                shards = finished_shards(store)
            prev_last = prev.get("last_row_id")
            if prev_last is None:  # version 1: the first keys file holds its rows
                with store.open(f"{KEYS}/000.parquet", "rb") as f:
                    prev_last = max((int(pc.max(b.column(0)).as_py()) for b in
                                     pq.ParquetFile(f).iter_batches(batch_size=BATCH, columns=["row_id"])
                                     if b.num_rows), default=-1)
            digest, added, top = match.digest(prev_last)
            excluded = match.excluded(shards)
    finally:
        os.unlink(tmp)

    rows = {"spec_hash": spec_hash, "sha256": digest, "read": counts["read"], "kept": counts["kept"],
            "invalid_url": counts["invalid_url"], "empty_caption": counts["empty_caption"]}
    history = list(prev.get("history") or []) + rounds
    m = build_manifest(store, META, spec=spec, spec_hash=spec_hash, rows=rows, history=history, progress=progress)
    from cloob.prepare.manifest import read_outcomes

    outcomes = read_outcomes(store, finished_shards(store)).without(removed)  # rows no longer in the source
    m = _versioned(m, version=n_prev + 1, excluded=excluded, removed=removed, added=added, gone=gone, back=back,
                   outcomes=outcomes, last_row_id=int(max(top, prev_last)))
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
               back: int, outcomes: RowOutcomes, last_row_id: int) -> dict:
    """The manifest `m` (of every shard) as version `version`'s: its totals over the version's rows
    (`outcomes`: the row outcomes less the removed rows)."""
    from cloob.prepare.manifest import content_hash

    t = m["totals"]
    ok_in_version = outcomes.n_ok
    t["successes"], t["failures"] = ok_in_version, len(outcomes.failed)
    t["attempted"] = attempted = ok_in_version + len(outcomes.failed)
    t["failures_by_reason"] = outcomes.by_reason()
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


