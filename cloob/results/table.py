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
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from cloob.errors import CloobError
from cloob.results.schema import KEY, NAMES, SCHEMA
from cloob.storage import atomic_write_bytes, is_local

PARTS = "parts"


def _fs(results_uri: str):
    fs, root = fsspec.core.url_to_fs(results_uri)
    return fs, root.rstrip("/")


def _url(fs, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def to_table(rows: list[dict]) -> pa.Table:
    unknown = sorted({k for r in rows for k in r} - set(NAMES))
    if unknown:
        raise CloobError(f"results rows have unknown column(s) {unknown}",
                         "use the columns of cloob/results/schema.py")
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
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex}.parquet"


def _write_part(results_uri: str, table: pa.Table) -> str:
    fs, root = _fs(results_uri)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path = posixpath.join(root, PARTS, _part_name())
    atomic_write_bytes(_url(fs, path), buf.getvalue())
    return _url(fs, path)


def append_rows(results_uri: str, rows: list[dict]) -> str:
    """Publish rows as one new part; returns its URI."""
    return _write_part(results_uri, to_table(rows))


def _list_parts(fs, root: str) -> list[str]:
    folder = posixpath.join(root, PARTS)
    try:
        paths = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in paths if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))


def _conform(table: pa.Table) -> pa.Table:
    # Parts written by an older version may lack a column (null) or hold extra ones (dropped).
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in SCHEMA]
    return pa.table(cols, schema=SCHEMA)


def _read(fs, paths: list[str]) -> pa.Table:
    tables = []
    for p in paths:
        try:
            with fs.open(p, "rb") as f:
                tables.append(_conform(pq.read_table(f)))
        except FileNotFoundError:
            continue  # compacted away since the listing: its rows are in the compacted part
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


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
    return order.take(pa.array(sorted(keep), type=pa.int64()))


def read_rows(results_uri: str, latest: bool = True) -> pa.Table:
    """The table (an empty one with the schema if nothing was written yet)."""
    fs, root = _fs(results_uri)
    table = _read(fs, _list_parts(fs, root))
    return latest_rows(table) if latest else table


def to_pandas(results_uri: str, latest: bool = True):
    return read_rows(results_uri, latest).to_pandas()


def compact(results_uri: str) -> dict:
    """Fold the current parts into one. Rows appended meanwhile are in parts not listed here and
    stay; a concurrent compaction at worst duplicates rows, which latest=True reads as one."""
    fs, root = _fs(results_uri)
    paths = _list_parts(fs, root)
    if len(paths) < 2:
        return {"parts_before": len(paths), "rows": None, "part": None}
    table = _read(fs, paths)
    part = _write_part(results_uri, table)
    for p in paths:
        try:
            fs.rm(p)
        except FileNotFoundError:
            pass
    return {"parts_before": len(paths), "rows": len(table), "part": part}
