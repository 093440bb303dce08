"""A source row's identity across re-exports of its table, as the dataset's keys files
(`_cloob/keys/NNN.parquet`) hold the identities given row ids so far: what cloob.prepare.matching
matches a re-read source against. An identity is the row's declared key (a table's key column,
YFCC's photo id), else its url and caption; stored as a 16-byte digest, with the occurrence number
mixed in so that a row listed twice is two rows."""

from __future__ import annotations

import hashlib

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


def write_parquet(store: Location, rel: str, table: pa.Table) -> None:
    """`table` as `rel` of the dataset folder, written whole."""
    with staged(store, rel) as tmp:
        pq.write_table(table, tmp)
