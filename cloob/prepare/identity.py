"""A source row's identity across re-exports of its table, and the identities a dataset has given
row ids so far (`_cloob/keys/NNN.parquet`): what cloob.prepare.versions matches a re-read source
against. An identity is the row's declared key (a table's key column, YFCC's photo id), else its url
and caption; stored as a 16-byte digest, with the occurrence number mixed in so that a row listed
twice is two rows."""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cloob.prepare.folder import META, staged
from cloob.storage import Location

KEYS = f"{META}/keys"
KEY_SCHEMA = pa.schema([("key", pa.binary(16)), ("row_id", pa.int64())])
BATCH = 65536


def identity(row: dict) -> str:
    """What identifies a source row across re-exports: its declared key (a table's key column,
    YFCC's photo id), else its url and caption."""
    sk = row.get("source_key") or ""
    if sk.startswith(("key:", "photo:")):
        return sk
    return f"{row['url']}\t{row['caption']}"


def digest16(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def as_u64(buf: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint64).reshape(-1, 2)  # no copy (the buffer is not resized after)


def with_occurrence(keys: np.ndarray) -> np.ndarray:
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


def key_array(keys: np.ndarray) -> pa.Array:
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(keys), [None, pa.py_buffer(keys.tobytes())])


def _keys_of_rows_file(store: Location) -> pa.Table:
    """The first version's identities, from _cloob/rows.parquet (its rows in row-id order)."""
    buf, ids = bytearray(), []
    with store.open(f"{META}/rows.parquet", "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH, columns=["row_id", "url", "caption",
                                                                                "source_key"]):
            cols = [batch.column(c).to_pylist() for c in ("url", "caption", "source_key")]
            for url, caption, sk in zip(*cols):
                buf += digest16(identity({"url": url, "caption": caption, "source_key": sk}))
            ids.append(batch.column("row_id"))
    row_ids = pa.concat_arrays(ids) if ids else pa.array([], pa.int64())
    return pa.table({"key": key_array(with_occurrence(as_u64(buf))), "row_id": row_ids}, schema=KEY_SCHEMA)


def write_parquet(store: Location, rel: str, table: pa.Table) -> None:
    """`table` as `rel` of the dataset folder, written whole."""
    with staged(store, rel) as tmp:
        pq.write_table(table, tmp)


def known_keys(store: Location) -> pa.Table:
    """Every identity given a row id so far (writing keys/000.parquet first for a dataset made before
    versions existed)."""
    store.refresh()
    names = sorted(store.glob(f"{KEYS}/*.parquet")) if store.exists(KEYS) else []
    if not names:
        write_parquet(store, f"{KEYS}/000.parquet", _keys_of_rows_file(store))
        names = [f"{KEYS}/000.parquet"]
    tables = []
    for name in names:
        with store.open(name if name.startswith(META) else f"{KEYS}/{posixpath.basename(name)}", "rb") as f:
            tables.append(pq.read_table(f, schema=KEY_SCHEMA))
    return pa.concat_tables(tables)
