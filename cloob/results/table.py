"""The results table: immutable parquet parts under `<results>/parts/`, one per append.

Appending never rewrites a shared file, so any number of processes and hosts can write at once, on a
local folder or an object store, with no lock and no lost row: each part is published atomically
(temporary file + rename locally, one PUT on S3). Reading takes the union of the parts; with
latest=True one row per (run_id, checkpoint_id, dataset), the newest. `compact` folds the parts into
one, deleting only the parts it has read.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from cloob.errors import CloobError
from cloob.results.schema import KEY, NAMES, SCHEMA
from cloob.storage import Location

PARTS = "parts"
# A listed part can vanish before it is read (a compaction folded it into a newer part): list again.
_READ_ATTEMPTS = 10
_REMOTE_THREADS = 16


def to_table(rows: list[dict]) -> pa.Table:
    """Rows -> a table with exactly SCHEMA (absent columns null); CloobError names a bad column."""
    if not rows:
        raise CloobError("no rows to append to the results table", "pass at least one row")
    if not all(isinstance(r, dict) for r in rows):
        raise CloobError("results rows must be dicts (column name -> value)", "pass a list of dicts")
    unknown = sorted({k for r in rows for k in r} - set(NAMES))
    if unknown:
        raise CloobError(f"results rows have unknown column(s) {unknown}",
                         "use the columns of cloob/results/schema.py")
    for name in KEY:
        if any(r.get(name) is None for r in rows):
            raise CloobError(f"results column {name!r} is missing in a row: it is part of the key {KEY}",
                             f"give every row a {name}")
    columns = {}
    for field in SCHEMA:
        values = [r.get(field.name) for r in rows]
        try:
            columns[field.name] = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
            raise CloobError(f"results column {field.name!r}: values {values[:3]} are not {field.type}: {e}",
                             "fix the value's type (see cloob/results/schema.py)") from None
    return pa.table(columns, schema=SCHEMA)


def _part_name() -> str:
    # Time first so that a listing is roughly chronological; the uuid makes names unique across hosts.
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex}.parquet"


def _write_part(results: Location, table: pa.Table) -> str:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    rel = posixpath.join(PARTS, _part_name())
    results.write_bytes(rel, buf.getvalue())
    return results.url(rel)


def append_rows(results_uri: str, rows: list[dict]) -> str:
    """Publish rows as one new part; returns its URI."""
    return _write_part(Location(results_uri), to_table(rows))


def _list_parts(results: Location) -> list[str]:
    # A fresh listing (s3fs caches them per file system: other processes' parts would stay invisible).
    return [posixpath.join(PARTS, n) for n in results.list(PARTS) if n.endswith(".parquet") and not n.startswith("_")]


def _conform(table: pa.Table, where: str) -> pa.Table:
    # Parts written by an older version may lack a column (null) or hold extra ones (dropped).
    cols = []
    for f in SCHEMA:
        if f.name not in table.column_names:
            cols.append(pa.nulls(len(table), f.type))
            continue
        try:
            cols.append(table.column(f.name).cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise CloobError(f"results part {where}: column {f.name!r} is {table.schema.field(f.name).type}, "
                             f"not {f.type}: {e}", "move the part out of the results folder") from None
    return pa.table(cols, schema=SCHEMA)


def _map(results: Location, fn: Callable, items: Iterable) -> list:
    items = list(items)
    if results.is_local or len(items) < 2:
        return [fn(x) for x in items]
    # Object stores: one request per part, so many at once.
    with ThreadPoolExecutor(min(_REMOTE_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _load_part(results: Location, rel: str) -> pa.Table | None:
    """The part conformed to SCHEMA; None if it is gone."""
    try:
        data = results.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise CloobError(f"results part {results.url(rel)} is not a readable parquet file: {e}",
                         "move it out of the results folder") from None
    return _conform(table, results.url(rel))


def _read_parts(results: Location) -> tuple[pa.Table, list[str]]:
    """Every row of one complete listing, and the parts they came from.

    A compaction publishes its part before it deletes the parts it folded in, so when a listed part
    has vanished, a new listing holds its rows: list again (parts never change, so the ones already
    read are kept)."""
    loaded: dict[str, pa.Table] = {}
    for _ in range(_READ_ATTEMPTS):
        paths = _list_parts(results)
        todo = [p for p in paths if p not in loaded]
        vanished = False
        for p, t in zip(todo, _map(results, lambda p: _load_part(results, p), todo)):
            if t is None:
                vanished = True
            else:
                loaded[p] = t
        if not vanished:
            tables = [loaded[p] for p in paths]
            return (pa.concat_tables(tables) if tables else SCHEMA.empty_table()), paths
    raise CloobError(f"results parts under {results.url()} kept vanishing while being read",
                     "a compaction may be running: try again in a moment")


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per KEY: the greatest finished_at (then row_uuid)."""
    if len(table) == 0:
        return table
    order = table.sort_by([("finished_at", "descending"), ("row_uuid", "descending")])
    keys = list(zip(*(order.column(k).to_pylist() for k in KEY)))
    seen, keep = set(), []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return order.take(pa.array(keep, type=pa.int64()))


def read_rows(results_uri: str, latest: bool = True) -> pa.Table:
    """The table (an empty one with the schema if nothing was written yet)."""
    table, _ = _read_parts(Location(results_uri))
    return latest_rows(table) if latest else table


def to_pandas(results_uri: str, latest: bool = True):
    """read_rows as a pandas DataFrame."""
    return read_rows(results_uri, latest).to_pandas()


def compact(results_uri: str) -> dict:
    """Fold the current parts into one. Rows appended meanwhile are in parts not listed here and
    stay; a concurrent compaction at worst duplicates rows, which latest=True reads as one."""
    results = Location(results_uri)
    table, paths = _read_parts(results)
    if len(paths) < 2:
        return {"parts_before": len(paths), "rows": len(table), "part": results.url(paths[0]) if paths else None}
    # Publish the union first, then delete exactly the parts read: a crash in between only duplicates.
    # A part already gone was removed by a concurrent compaction; its rows are in that one's part.
    part = _write_part(results, table)
    _map(results, results.remove, paths)
    return {"parts_before": len(paths), "rows": len(table), "part": part}
