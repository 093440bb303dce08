"""The rows of a prepared dataset in row-id order, and their digest.

`cloob prepare` writes its rows (`_cloob/rows.parquet`) in row-id order, so that which rows land in
which shard, and so the dataset's content hash, depend on the rows alone, not on the order a source
holds them in. Most sources give their rows in that order already (a table's line, the demo's index,
the 25-column YFCC file's line), and then nothing is done here. YFCC's SQLite database and original
parts hold the photos in an order of their own, with the row id (the subset list's line number) taken
from elsewhere: those rows are sorted here, in bounded memory (sorted runs written to temporary
parquet files beside the target, then merged).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import tempfile
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

RUN_ROWS = 500_000  # rows sorted in memory at a time (~150 MB for YFCC's urls and captions)
_READ_ROWS = 4096   # rows read at a time from each run while merging
_WRITE_ROWS = 65536


def row_line(row_id: int, url: str, caption: str) -> bytes:
    """What the rows' digest covers of one row."""
    return f"{row_id}\t{url}\t{caption}\n".encode()


def _runs(src: str, run_rows: int, folder: str) -> list[str]:
    """Sorted runs of `src` (stable: rows with equal ids keep their order), as parquet files."""
    runs: list[str] = []
    pending: list[pa.RecordBatch] = []
    n = 0

    def flush() -> None:
        nonlocal pending, n
        if not pending:
            return
        table = pa.Table.from_batches(pending).sort_by("row_id")  # Arrow's sort is stable
        path = os.path.join(folder, f"run-{len(runs):05d}.parquet")
        pq.write_table(table, path)
        runs.append(path)
        pending, n = [], 0

    for batch in pq.ParquetFile(src).iter_batches(batch_size=min(run_rows, _WRITE_ROWS)):
        pending.append(batch)
        n += batch.num_rows
        if n >= run_rows:
            flush()
    flush()
    return runs


def _read_run(path: str, order: int) -> Iterator[tuple]:
    """(row_id, run order, position, row dict) of a run's rows, in order."""
    pos = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_READ_ROWS):
        for row in batch.to_pylist():
            yield row["row_id"], order, pos, row
            pos += 1


def sort_rows(src: str, dst: str, schema: pa.Schema, run_rows: int = RUN_ROWS) -> str:
    """Write `src`'s rows to `dst` in row-id order (stable); returns the digest of the sorted rows."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix=".tmp-sort-", dir=os.path.dirname(os.path.abspath(dst))) as folder:
        runs = _runs(src, run_rows, folder)
        merged: Iterable[tuple] = heapq.merge(*(_read_run(p, i) for i, p in enumerate(runs)))
        with pq.ParquetWriter(dst, schema) as writer:
            cols: dict[str, list] = {k: [] for k in schema.names}
            for _, _, _, row in merged:
                for k in schema.names:
                    cols[k].append(row[k])
                digest.update(row_line(row["row_id"], row["url"], row["caption"]))
                if len(cols["row_id"]) >= _WRITE_ROWS:
                    writer.write_table(pa.table(cols, schema=schema))
                    for v in cols.values():
                        v.clear()
            if cols["row_id"]:
                writer.write_table(pa.table(cols, schema=schema))
    return digest.hexdigest()
