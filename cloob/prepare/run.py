"""Prepare a pretraining dataset: spec -> url/caption rows -> img2dataset -> shards + manifest.

Layout of a prepared dataset at `out` (a folder or any fsspec URL, e.g. s3://bucket/datasets/cc3m):

    NNNNN.tar, NNNNN.parquet, NNNNN_stats.json   img2dataset's shards; the stats file, written
                                                  last, marks a shard finished
    _cloob/spec.json                              the spec and its content hash (who owns `out`)
    _cloob/rows.parquet, rows.json                row_id/url/caption rows, in row-id order (sorted
                                                  when the source holds them otherwise: rowsort);
                                                  rows.json marks them done
    _cloob/retry/NNN.parquet                      rows given to a retry-failed round
    _cloob/digests/NNNNN.json                     per-shard digests (so a re-run does not re-read)
    _cloob/logs/*.log                             img2dataset's output per round
    _cloob/manifest.json                          written last, atomically: what the shards hold
    _cloob/lock.json                              while a `cloob prepare` works on it (cloob.lock)
    _cloob/versions/, keys/, source.json          later versions (cloob.prepare.versions)

Nothing of ours sits at the top level as *.json: img2dataset reads every top-level *.json as a
finished shard's stats.

`out` must be new, empty, or made by cloob prepare (it holds _cloob/spec.json): a folder of other
files is refused before anything is written, --force included, so a user's files are never
overwritten, and neither is a top-level *.json that is not a shard's stats (img2dataset would take
it for one). One preparation at a time: the whole of it holds the folder's lock, and a second one
is refused naming the first. Every step is resumable: rows are reused once rows.json exists,
img2dataset's incremental mode skips finished shards, and a killed round leaves at most unfinished
shards (no stats file), which the next run redoes. A retry-failed round gives the rows whose status
is not success to img2dataset again, as new shards after the last one ("extend" mode).

This is the first version's way. Once its manifest is written, a run reads the source again and
makes the next version from the rows that are new (and, with --retry-failed, those that failed),
again as new shards after the last one: cloob.prepare.versions.

img2dataset runs on this machine's processes or, with download.distributor pyspark or ray, on a
Spark or Ray cluster (cloob.prepare.distributors); either way each round's shards are checked against
their stats files afterwards, and a shard missing is an error naming it.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cloob.errors import CloobError
from cloob.lock import folder_lock
from cloob.prepare import distributors
from cloob.prepare.download.rounds import run_round
from cloob.prepare.folder import META, OURS, check_folder, check_owner, next_retry_file, record_owner, staged, write_json
from cloob.prepare.manifest import build_manifest, finished_shards
from cloob.prepare.rowsort import row_line, sort_rows
from cloob.prepare.sources import iter_rows
from cloob.prepare.spec import DemoSource, PretrainSpec, Yfcc15mSource
from cloob.safetext import safe_text
from cloob.storage import Location

ROW_SCHEMA = pa.schema([("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                        ("source_key", pa.string())])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _with_input(spec: PretrainSpec, input_uri: str | list[str] | None) -> PretrainSpec:
    """The spec with its source file(s) from --input: one file, or several for YFCC's original
    release (a single one is kept as a string, as a spec written before lists were taken)."""
    uris = [input_uri] if isinstance(input_uri, str) else list(input_uri or [])
    if not uris:
        return spec
    src = spec.source
    if isinstance(src, DemoSource):
        raise CloobError("the demo spec generates its rows and takes no --input", "leave out --input")
    if len(uris) > 1 and not isinstance(src, Yfcc15mSource):
        raise CloobError(f"the {src.kind} source reads one file, and --input was given {len(uris)} times",
                         "pass --input once (several are for YFCC100M's ten original parts)")
    field = "metadata" if isinstance(src, Yfcc15mSource) else "path"
    value = uris[0] if len(uris) == 1 else uris
    return spec.model_copy(update={"source": src.model_copy(update={field: value})})


def _ensure_rows(store: Location, spec: PretrainSpec, spec_hash: str, progress: bool) -> dict:
    from tqdm import tqdm

    info_path = f"{META}/rows.json"
    info = store.read_json(info_path)
    if info and info.get("spec_hash") == spec_hash:
        return info
    import hashlib

    counts: Counter = Counter()
    digest = hashlib.sha256()
    # (The folders exist: the lock made them, and removes them again if this fails on a first run.)
    fd, tmp = tempfile.mkstemp(dir=store.path(META) if store.is_local else None, prefix=".tmp-rows-",
                               suffix=".parquet")
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, ROW_SCHEMA) as writer:
            cols: dict[str, list] = {k: [] for k in ROW_SCHEMA.names}

            def flush():
                if cols["row_id"]:
                    writer.write_table(pa.table(cols, schema=ROW_SCHEMA))
                    for v in cols.values():
                        v.clear()

            bar = tqdm(desc=f"{spec.name}: reading rows", unit=" rows", disable=not progress, leave=False)
            last, in_order = None, True
            for row in iter_rows(spec, counts, progress):
                for k in ROW_SCHEMA.names:
                    cols[k].append(row[k])
                digest.update(row_line(row["row_id"], row["url"], row["caption"]))
                in_order = in_order and (last is None or row["row_id"] >= last)
                last = row["row_id"]
                bar.update()
                if len(cols["row_id"]) >= 65536:
                    flush()
            flush()
            bar.close()
        if counts["kept"] == 0:
            raise CloobError(
                f"the source of {spec.name!r} gave no usable rows (read {counts['read']}, invalid URL "
                f"{counts['invalid_url']}, empty caption {counts['empty_caption']})",
                "check the source file and its columns (url must be http(s), caption non-empty)")
        rows_sha256 = digest.hexdigest()
        if not in_order:  # the rows go in row-id order (cloob.prepare.rowsort): the shards follow the rows alone
            fd, ordered = tempfile.mkstemp(dir=os.path.dirname(tmp), prefix=".tmp-rows-", suffix=".parquet")
            os.close(fd)
            try:
                rows_sha256 = sort_rows(tmp, ordered, ROW_SCHEMA)
                os.replace(ordered, tmp)
            finally:
                if os.path.exists(ordered):
                    os.unlink(ordered)
        store.move_in(tmp, f"{META}/rows.parquet")
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise CloobError(f"preparing the rows of {spec.name!r} failed: {type(e).__name__}: {safe_text(e)}",
                             "check that the source is readable and --out writable (for a bucket: that it "
                             "exists and the credentials)") from None
        raise
    info = {"spec_hash": spec_hash, "sha256": rows_sha256, "file": f"{META}/rows.parquet",
            "read": counts["read"], "kept": counts["kept"], "invalid_url": counts["invalid_url"],
            "empty_caption": counts["empty_caption"]}
    write_json(store, info_path, info)
    return info


def _failed_rows(store: Location, shards: dict[int, str]) -> np.ndarray:
    """The ids of the rows that failed in every shard they were given to, sorted (int64)."""
    from cloob.prepare.manifest import read_outcomes

    return np.sort(read_outcomes(store, shards).failed)


def _write_retry_rows(store: Location, row_ids: np.ndarray) -> str:
    """The rows to retry as `_cloob/retry/NNN.parquet` (the next free number); its relative path."""
    import pyarrow.compute as pc

    target = next_retry_file(store)
    wanted = pa.array(row_ids, pa.int64())
    with staged(store, target, ".tmp-retry-") as tmp, store.open(f"{META}/rows.parquet", "rb") as f, \
            pq.ParquetWriter(tmp, ROW_SCHEMA) as writer:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536):
            t = pa.Table.from_batches([batch])
            writer.write_table(t.filter(pc.is_in(t["row_id"], value_set=wanted)))
    return target


def _remove_unfinished(store: Location, done: dict[int, str], from_id: int) -> None:
    """Delete shard files from `from_id` on that have no stats file (a killed retry round's), so the
    next round's shard ids are free."""
    store.refresh()
    for name in store.list(hidden=True):
        m = OURS.match(name)
        if m and int(m.group(1)) >= from_id and int(m.group(1)) not in done:
            store.remove(name)


@contextlib.contextmanager
def _source_server(spec: PretrainSpec):
    """The local picture server for the demo source (None for real sources)."""
    if not isinstance(spec.source, DemoSource):
        yield None
        return
    from cloob.prepare.demo_server import DemoServer

    with DemoServer() as server:
        yield server.url


def prepare(spec: PretrainSpec, out: str, *, input: str | list[str] | None = None, retry_failed: bool = False,
            force: bool = False, progress: bool = True, cluster: str | None = None,
            cluster_flag: str = "--cluster") -> dict:
    """Prepare (or complete) the dataset at `out`; returns the manifest plus a `run` summary.
    Under download.distributor pyspark or ray, `cluster` is the Spark master or Ray address
    (see cloob.prepare.distributors for the defaults); cluster_flag: the option it came in, for errors."""
    t0 = time.monotonic()
    spec = _with_input(spec, input)
    spec_hash = spec.content_hash()
    store = Location(out)
    cluster = distributors.check_cluster(spec.download.distributor, store.url(), store.is_local, cluster,
                                         cluster_flag)
    check_folder(store)  # before the lock: the lock would write into a folder we may not touch
    with folder_lock(store.url(META), purpose=f"cloob prepare {spec.name}",
                     alternative="prepare into another --out", label=store.url()):
        check_owner(store, spec, spec_hash, force)
        return _prepare_locked(store, spec, spec_hash, retry_failed, progress, t0, cluster)


def _prepare_locked(store: Location, spec: PretrainSpec, spec_hash: str, retry_failed: bool, progress: bool,
                    t0: float, cluster: dict) -> dict:
    from cloob.prepare.versions import latest_version, parsed_or_none

    manifest_path = f"{META}/manifest.json"
    newest = latest_version(store, repair=True)  # a damaged newest file restored from its copy, and said
    # A damaged manifest beside intact versions: the newest version is what it held.
    old = parsed_or_none(store, manifest_path) or (newest if newest and store.exists(f"{META}/versions") else None)
    store.refresh()
    lost = [e["shard"] for e in (old or {}).get("shards", []) if int(e["shard"][:-4]) not in finished_shards(store)]
    if lost and old and "version" in old:
        raise CloobError(f"{store.url()}: {len(lost)} shards of version {old['version']} are missing "
                         f"({', '.join(lost[:10])}); later versions' rows went into shards of their own",
                         "copy them back from a backup, or prepare the dataset again into a new --out")
    if lost and (store.read_json(f"{META}/rows.json") or {}).get("spec_hash") != spec_hash:
        raise CloobError(f"{store.url()}: {len(lost)} shards of the dataset are missing ({', '.join(lost[:10])}), "
                         "and the source is not where its rows were read from",
                         "rerun with the source of the first preparation (--input / source.path) to fetch them "
                         "again, then with the new one")
    if old is not None and old.get("name") == spec.name and not lost:
        # The first version is complete: read the source again for the next one (cloob.prepare.versions).
        # A source at another location is a new version of the same dataset, not a new dataset.
        # (A first version with shards lost since goes the first version's way: they are fetched again.)
        from cloob.prepare.versions import next_version

        with _source_server(spec) as proxy:
            def extend(url_list: str, n: int, expect: list[int]) -> dict:
                return run_round(store, spec, url_list, "extend", n, expect, proxy, cluster, progress)

            out = next_version(store, spec, spec_hash, retry_failed=retry_failed, progress=progress,
                               run_round=extend)
        record_owner(store, spec, spec_hash)  # after: a source that fails to read leaves the owner as it was
        out["run"]["seconds"] = round(time.monotonic() - t0, 2)
        return out
    from cloob.prepare.versions import SOURCE_STATE, fingerprint

    cached = (store.read_json(f"{META}/rows.json") or {}).get("spec_hash") == spec_hash
    source_state = None if cached else fingerprint(spec)  # taken before the read: a later change is new
    rows = _ensure_rows(store, spec, spec_hash, progress)  # a bad source fails here, before any write
    record_owner(store, spec, spec_hash)
    history = list(old["history"]) if old and old.get("spec_hash") == spec_hash else []
    expected = math.ceil(rows["kept"] / spec.download.shard_size)
    store.refresh()
    done = finished_shards(store)
    missing = [i for i in range(expected) if i not in done]
    rounds = []
    with _source_server(spec) as proxy:
        if missing:
            # This run's work, not the whole set's: a resumed run fetches only the missing shards
            # (img2dataset's incremental mode cuts the rows into shards in order, shard_size each).
            size = spec.download.shard_size
            fetched = sum(min(size, rows["kept"] - i * size) for i in missing)
            rounds.append({**run_round(store, spec, f"{META}/rows.parquet", "incremental",
                                        fetched, missing, proxy, cluster, progress),
                           "shards": len(missing), "shards_kept": expected - len(missing)})
            done = finished_shards(store)
        if retry_failed:
            failed = _failed_rows(store, done)
            if len(failed):
                _remove_unfinished(store, done, from_id=expected)
                retry_list = _write_retry_rows(store, failed)
                first = max(done, default=-1) + 1  # img2dataset's "extend" numbers on from the last stats file
                new = range(first, first + math.ceil(len(failed) / spec.download.shard_size))
                rounds.append(run_round(store, spec, retry_list, "extend", len(failed), list(new), proxy,
                                         cluster, progress))
    history += rounds
    manifest = build_manifest(store, META, spec=spec, spec_hash=spec_hash, rows=rows,
                              history=history, progress=progress)
    manifest["updated_at"] = _now()
    write_json(store, manifest_path, manifest)
    if source_state is not None:
        write_json(store, SOURCE_STATE, {"fingerprint": source_state, "version": 1})
    return {**manifest, "run": {"seconds": round(time.monotonic() - t0, 2), "rounds": rounds, "noop": False}}


def read_manifest(out: str) -> dict | None:
    """The manifest of the dataset prepared at `out`, or None if it is not (yet) complete."""
    return Location(out).read_json(f"{META}/manifest.json")
