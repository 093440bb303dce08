"""Matching a re-read source with the rows a dataset already knows, in bounded memory.

cloob.prepare.versions streams the source into a temporary parquet file (its rows in source order,
each with its identity's and its content's 16-byte digests); `Match` gives every row its row id (a
known identity keeps its id, a new one gets the next free id, in source order), and says which rows
to fetch, which known rows are gone, and the rows' digest, without holding the rows in memory:

1. identities are blake2b digests (uniform): their leading bits split the source's rows (position,
   identity, content) and the known identities (_cloob/keys/*.parquet: identity, row id) alike into
   2**bits partitions, temporary Arrow files on local disk. An identity, listed once or twice,
   always lands in the same partition, in source order there, so the occurrence numbers
   (identity.with_occurrence) and the match of each partition on its own (an Arrow hash join) are
   those of the whole table;
2. the matched rows go, with their row ids, into buckets by source position, which read back in
   order give the rows in source order again: the new rows get their ids there, and the rows to
   fetch (img2dataset's url list) and the new identities (the next keys file) are written as the
   whole-table code wrote them, byte for byte;
3. the rows' digest, sha256 over their row ids and then their content digests in row-id order, is
   taken over buckets by row id read back in order: the same bytes as one sort of every row.

Memory: one partition or bucket at a time, PARTITION_ROWS rows on average (env
CLOOB_MATCH_PARTITION_ROWS), plus one byte a row id for each of three flags (given to a shard,
succeeded there, matched now) and the ids of the removed rows (which the version lists anyway); the
new keys file is written ROW_GROUP rows at a time. A single identity listed more than PARTITION_ROWS
times makes its partition that big. Measured: BENCHMARKS.md, "re-reading the source at scale".
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cloob.prepare.folder import META, staged
from cloob.prepare.identity import BATCH, KEY_SCHEMA, KEYS, digest16, identity, key_array, with_occurrence
from cloob.storage import Location

PARTITION_ROWS = int(os.environ.get("CLOOB_MATCH_PARTITION_ROWS") or 1 << 18)
ROW_GROUP = 1 << 20  # pq.write_table's rows per row group: a file written in parts comes out the same
DIGEST = pa.binary(16)
BY_KEY = pa.schema([("pos", pa.int64()), ("key", DIGEST), ("content", DIGEST)])
BY_POS = pa.schema([("pos", pa.int64()), ("row_id", pa.int64()), ("key", DIGEST), ("content", DIGEST)])
BY_ID = pa.schema([("row_id", pa.int64()), ("content", DIGEST)])


def fixed16(buf: bytes | bytearray) -> pa.Array:
    """Concatenated 16-byte digests as an Arrow column (a copy: the buffer may be reused)."""
    return pa.FixedSizeBinaryArray.from_buffers(DIGEST, len(buf) // 16, [None, pa.py_buffer(bytes(buf))])


def digests(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column of 16-byte digests as (n, 2) uint64, as identity.as_u64 reads them."""
    a = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(a) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.frombuffer(a.buffers()[1], dtype=np.uint64, count=2 * len(a), offset=16 * a.offset).reshape(-1, 2)


def _bits(rows: int) -> int:
    """Leading bits that split `rows` uniform digests into partitions of PARTITION_ROWS or fewer."""
    bits = 0
    while (rows >> bits) > PARTITION_ROWS:
        bits += 1
    return bits


def _partition(keys: np.ndarray, bits: int) -> np.ndarray:
    if bits == 0:
        return np.zeros(len(keys), dtype=np.int64)
    return (keys[:, 0] >> np.uint64(64 - bits)).astype(np.int64)


def _pos_rows() -> int:
    """Positions a bucket by source position holds: whole BATCH-row groups of the source file."""
    return BATCH * max(1, PARTITION_ROWS // BATCH)


def _batches(source, columns: list[str]):
    """A parquet file's rows, BATCH at a time, read on this thread without pre-buffering: the
    readers' threads and buffers leave the process's memory high after them otherwise."""
    return pq.ParquetFile(source, pre_buffer=False).iter_batches(batch_size=BATCH, columns=columns,
                                                                 use_threads=False)


def _flag(flags: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.zeros(len(ids), dtype=bool)
    inside = ids < len(flags)
    out[inside] = flags[ids[inside]]
    return out


class Spill:
    """Tables' rows scattered by a bucket number into temporary Arrow files, read back one bucket at a
    time, in the order they were added."""

    def __init__(self, folder: str, name: str, schema: pa.Schema):
        self.folder, self.name, self.schema, self.writers = folder, name, schema, {}

    def _path(self, b: int) -> str:
        return os.path.join(self.folder, f"{self.name}-{b:06d}.arrow")

    def add(self, bucket: np.ndarray, table: pa.Table) -> None:
        if not len(table):
            return
        order = np.argsort(bucket, kind="stable")
        b = bucket[order]
        table = table.take(pa.array(order))
        cuts = np.flatnonzero(b[1:] != b[:-1]) + 1
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(b)]):
            w = self.writers.get(int(b[s]))
            if w is None:
                sink = pa.OSFile(self._path(int(b[s])), "wb")
                w = self.writers[int(b[s])] = (sink, pa.ipc.new_stream(sink, self.schema))
            w[1].write_table(table.slice(s, e - s))

    def close(self) -> None:
        for sink, w in self.writers.values():
            w.close()
            sink.close()
        self.writers.clear()

    def read(self, b: int) -> pa.Table:
        """Bucket b's rows (its file is removed)."""
        self.close()
        path = self._path(b)
        if not os.path.exists(path):
            return self.schema.empty_table()
        with pa.OSFile(path) as f:
            t = pa.ipc.open_stream(f).read_all()
        os.unlink(path)
        return t


class RowGroups:
    """A parquet file written in parts as they come, ROW_GROUP rows at a time: the file that
    pq.write_table makes of the whole table."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path, self.schema, self.parts, self.rows, self.written = path, schema, [], 0, False
        self.writer = pq.ParquetWriter(path, schema)

    def write(self, t: pa.Table) -> None:
        self.parts.append(t)
        self.rows += len(t)
        while self.rows >= ROW_GROUP:
            self._flush(ROW_GROUP)

    def _flush(self, rows: int) -> None:
        whole = pa.concat_tables(self.parts) if self.parts else self.schema.empty_table()
        self.writer.write_table(whole.slice(0, rows))
        self.parts, self.rows, self.written = [whole.slice(rows)], self.rows - rows, True

    def close(self) -> None:
        if self.rows or not self.written:
            self._flush(self.rows)
        self.writer.close()


def _in_order(t: pa.Table, start: int, rows: int) -> pa.Table:
    """A bucket by position, sorted: the positions start .. start + rows - 1, each once."""
    t = t.take(pc.sort_indices(t["pos"]))
    pos = t["pos"].to_numpy()
    assert len(pos) == rows and (rows == 0 or (pos[0] == start and pos[-1] == start + rows - 1)), (start, rows)
    return t


def key_files(store: Location, folder: str | None) -> list[str]:
    """The keys files, oldest first (writing keys/000.parquet first for a dataset made before versions
    existed, from version 1's rows file; temporary files under `folder`)."""
    store.refresh()
    names = sorted(store.glob(f"{KEYS}/*.parquet")) if store.exists(KEYS) else []
    if not names:
        tmp = tempfile.mkdtemp(dir=folder, prefix=".tmp-keys-")
        try:
            _first_keys(store, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        names = [f"{KEYS}/000.parquet"]
    return [n if n.startswith(META) else f"{KEYS}/{posixpath.basename(n)}" for n in names]


def _first_keys(store: Location, tmp: str) -> None:
    """keys/000.parquet: version 1's identities (occurrences counted in row-id order) in its rows
    file's order, partitioned as `Match` does."""
    schema = pa.schema([("pos", pa.int64()), ("key", DIGEST), ("row_id", pa.int64())])
    with store.open(f"{META}/rows.parquet", "rb") as f:
        bits = _bits(pq.ParquetFile(f).metadata.num_rows)
        f.seek(0)
        parts, at = Spill(tmp, "rows", schema), 0
        for batch in _batches(f, ["row_id", "url", "caption", "source_key"]):
            buf = bytearray()
            for url, caption, sk in zip(*(batch.column(c).to_pylist() for c in ("url", "caption", "source_key"))):
                buf += digest16(identity({"url": url, "caption": caption, "source_key": sk}))
            keys = fixed16(buf)
            pos = np.arange(at, at + len(keys), dtype=np.int64)
            parts.add(_partition(digests(keys), bits),
                      pa.table([pa.array(pos), keys, batch.column("row_id").cast(pa.int64())], schema=schema))
            at += len(keys)
    by_pos, step = Spill(tmp, "rows-by-pos", schema), _pos_rows()
    for p in range(1 << bits):
        t = parts.read(p)
        t = t.set_column(1, "key", key_array(with_occurrence(digests(t["key"]))))
        by_pos.add(t["pos"].to_numpy() // step, t)
    with staged(store, f"{KEYS}/000.parquet") as path:
        out = RowGroups(path, KEY_SCHEMA)
        for b in range(-(-at // step)):
            out.write(_in_order(by_pos.read(b), b * step, min(step, at - b * step)).select(["key", "row_id"]))
        out.close()


def shard_flags(store: Location, shards: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """(given to a finished shard, succeeded there): one flag a row id."""
    tried, ok = np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    for stem in shards.values():
        with store.open(f"{stem}.parquet", "rb") as f:
            t = pq.read_table(f, columns=["row_id", "status"])
        ids = t["row_id"].to_numpy(zero_copy_only=False)
        if len(ids) and ids.max() >= len(tried):
            size = max(int(ids.max()) + 1, 2 * len(tried))
            tried, ok = (np.concatenate([a, np.zeros(size - len(a), dtype=bool)]) for a in (tried, ok))
        tried[ids] = True
        ok[ids[pc.equal(t["status"], "success").to_numpy(zero_copy_only=False)]] = True
    return tried, ok


class Match:
    """The source file's rows (n of them, in source order) matched with the dataset's known rows; the
    temporary files live in a folder under `folder` (None: the system's) until close()."""

    def __init__(self, store: Location, source_file: str, n: int, folder: str | None):
        self.store, self.source_file, self.n = store, source_file, n
        self.tmp = tempfile.mkdtemp(dir=folder, prefix=".tmp-match-")
        self.fresh_file = self.delta_file = None
        self.n_fresh = self.n_pending = 0
        self.new_rows = False  # some row to fetch was never given to img2dataset

    def __enter__(self) -> Match:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self, tried: np.ndarray, ok: np.ndarray, retry_failed: bool) -> None:
        """Match; then `removed` (sorted ids of known rows no longer in the source), `n_fresh`,
        `n_pending` (rows to fetch: never given to a shard, or with retry_failed, failed there),
        `new_rows`, and the files `fresh_file` (the new rows' keys) and `delta_file` (the rows to
        fetch, with their row ids, as _cloob/retry/NNN.parquet holds them) where there are any."""
        names = key_files(self.store, self.tmp)
        n_known = 0
        for name in names:
            with self.store.open(name, "rb") as f:
                n_known += pq.ParquetFile(f).metadata.num_rows
        bits = _bits(max(self.n, n_known))
        known = self._known(names, bits)
        source, at = Spill(self.tmp, "source", BY_KEY), 0
        for batch in _batches(self.source_file, ["key", "content"]):
            pos = pa.array(np.arange(at, at + batch.num_rows, dtype=np.int64))
            source.add(_partition(digests(batch.column("key")), bits),
                       pa.table([pos, batch.column("key"), batch.column("content")], schema=BY_KEY))
            at += batch.num_rows
        assert at == self.n, (at, self.n)

        self.present = np.zeros(self.first_new, dtype=bool)
        unmatched, by_pos, step = [], Spill(self.tmp, "by-pos", BY_POS), _pos_rows()
        for p in range(1 << bits):
            s, k = source.read(p), known.read(p)
            keys = key_array(with_occurrence(digests(s["key"])))
            idx = pc.index_in(keys, value_set=k["key"])
            hit = pc.drop_null(idx).to_numpy(zero_copy_only=False)
            known_ids = k["row_id"].to_numpy()
            ids = np.full(len(s), -1, dtype=np.int64)
            ids[idx.is_valid().to_numpy(zero_copy_only=False)] = known_ids[hit]
            self.present[known_ids[hit]] = True
            left = np.ones(len(k), dtype=bool)
            left[hit] = False
            unmatched.append(known_ids[left])
            pos = s["pos"].to_numpy()
            by_pos.add(pos // step, pa.table([pa.array(pos), pa.array(ids), keys, s["content"]], schema=BY_POS))
        gone = np.concatenate(unmatched) if unmatched else np.zeros(0, dtype=np.int64)
        self.removed = np.unique(gone[~self.present[gone]])
        self._in_source_order(by_pos, step, tried, ok, retry_failed)

    def _known(self, names: list[str], bits: int) -> Spill:
        known, top = Spill(self.tmp, "known", KEY_SCHEMA), -1
        for name in names:
            with self.store.open(name, "rb") as f:
                for batch in _batches(f, ["key", "row_id"]):
                    t = pa.Table.from_batches([batch]).cast(KEY_SCHEMA)
                    if len(t):
                        top = max(top, int(pc.max(t["row_id"]).as_py()))
                    known.add(_partition(digests(t["key"]), bits), t)
        self.first_new = top + 1
        return known

    def _in_source_order(self, by_pos: Spill, step: int, tried: np.ndarray, ok: np.ndarray,
                         retry_failed: bool) -> None:
        """The rows back in source order: the new rows' ids and keys file, the rows to fetch."""
        from cloob.prepare.run import ROW_SCHEMA

        self.by_id = Spill(self.tmp, "by-id", BY_ID)
        fresh_out = delta = None
        batches = _batches(self.source_file, ["url", "caption", "source_key"])
        try:
            for b in range(-(-self.n // step)):
                t = _in_order(by_pos.read(b), b * step, min(step, self.n - b * step))
                ids = t["row_id"].to_numpy().copy()
                fresh = ids < 0
                k = int(fresh.sum())
                ids[fresh] = np.arange(self.first_new + self.n_fresh, self.first_new + self.n_fresh + k)
                self.n_fresh += k
                if k:
                    if fresh_out is None:
                        self.fresh_file = os.path.join(self.tmp, "fresh.parquet")
                        fresh_out = RowGroups(self.fresh_file, KEY_SCHEMA)
                    fresh_out.write(pa.table([t["key"].filter(pa.array(fresh)), pa.array(ids[fresh])],
                                             schema=KEY_SCHEMA))
                given = _flag(tried, ids)
                pending = ~given
                if retry_failed:
                    pending |= given & ~_flag(ok, ids)
                self.n_pending += int(pending.sum())
                self.new_rows |= bool((pending & ~given).any())
                self.by_id.add(ids // PARTITION_ROWS, pa.table([pa.array(ids), t["content"]], schema=BY_ID))
                at = 0
                while at < len(ids):  # the source's batches, filtered (as written before)
                    batch = next(batches)
                    assert at + batch.num_rows <= len(ids), "a source batch across two buckets"
                    mask = pending[at:at + batch.num_rows]
                    if mask.any():
                        if delta is None:
                            self.delta_file = os.path.join(self.tmp, "delta.parquet")
                            delta = pq.ParquetWriter(self.delta_file, ROW_SCHEMA)
                        rows = pa.Table.from_batches([batch]).filter(pa.array(mask))
                        rows = rows.append_column("row_id", pa.array(ids[at:at + batch.num_rows][mask], pa.int64()))
                        delta.write_table(rows.select(ROW_SCHEMA.names).cast(ROW_SCHEMA))
                    at += batch.num_rows
        finally:
            for out in (fresh_out, delta):
                if out is not None:
                    out.close()

    def digest(self, after: int) -> tuple[str, int, int]:
        """(sha256 over the rows' ids then their content digests, in row-id order; how many rows have
        an id above `after`; the highest row id)."""
        h, added, top = hashlib.sha256(), 0, -1
        contents = os.path.join(self.tmp, "contents")
        with open(contents, "wb") as out:
            for b in range(-(-(self.first_new + self.n_fresh) // PARTITION_ROWS)):
                t = self.by_id.read(b)
                ids = t["row_id"].to_numpy()
                order = np.argsort(ids)
                h.update(ids[order].astype("<i8").tobytes())
                out.write(digests(t["content"])[order].astype("<u8").tobytes())
                if len(ids):
                    added, top = added + int((ids > after).sum()), max(top, int(ids.max()))
        with open(contents, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest(), added, top

    def excluded(self, shards: dict[int, str]) -> list[str]:
        """The sample keys of rows that succeeded in a shard and are not in the source now."""
        out = []
        for stem in shards.values():
            with self.store.open(f"{stem}.parquet", "rb") as f:
                t = pq.read_table(f, columns=["row_id", "key", "status"])
            t = t.filter(pc.equal(t["status"], "success"))
            ids = t["row_id"].to_numpy(zero_copy_only=False)
            here = _flag(self.present, ids) | ((ids >= self.first_new) & (ids < self.first_new + self.n_fresh))
            out += t["key"].filter(pa.array(~here)).to_pylist()
        return sorted(out)
