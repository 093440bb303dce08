"""manifest.read_outcomes (arrays, column-wise) against the per-row Python implementation it replaced,
kept here as the reference: the same ids, the same last reasons, the same order of first failure, and
so the same failures_by_reason (counts and tie order) in the manifest and in a version's totals."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cloob.prepare.manifest import finished_shards, read_outcomes, reason_of, row_outcomes
from cloob.storage import Location


def reference_row_outcomes(store: Location, shards: dict[int, str]):
    """The implementation before read_outcomes (a Python object a row), as it was."""
    ok: set[int] = set()
    last_fail: dict[int, str] = {}
    for stem in shards.values():
        with store.open(f"{stem}.parquet", "rb") as f:
            t = pq.read_table(f, columns=["row_id", "status", "error_message"])
        for rid, status, err in zip(*(t.column(c).to_pylist() for c in ("row_id", "status", "error_message"))):
            if status == "success":
                ok.add(rid)
            else:
                last_fail[rid] = reason_of(err)
    for rid in ok:
        last_fail.pop(rid, None)
    return ok, last_fail


def _shards(folder, shards: list[list[tuple]]) -> Location:
    """One NNNNN.parquet and NNNNN_stats.json a list of (row_id, status, error_message)."""
    for i, rows in enumerate(shards):
        ids, status, errors = zip(*rows) if rows else ((), (), ())
        pq.write_table(pa.table({"row_id": pa.array(ids, pa.int64()), "status": pa.array(status, pa.string()),
                                 "error_message": pa.array(errors, pa.string())}), folder / f"{i:05d}.parquet")
        (folder / f"{i:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": 0}))
    return Location(str(folder))


def _compare(store: Location, removed=()):
    shards = finished_shards(store)
    ok, fails = reference_row_outcomes(store, shards)
    new = read_outcomes(store, shards)
    # the arrays, converted: the same ids, reasons and dict order (first failure first)
    assert new.ok_ids().dtype == np.int64 and new.failed.dtype == np.int64 and new.codes.dtype == np.int32
    assert new.ok_ids().tolist() == sorted(ok) and new.n_ok == len(ok)
    got = {rid: new.reasons[c] for rid, c in zip(new.failed.tolist(), new.codes.tolist())}
    assert list(got.items()) == list(fails.items())
    assert row_outcomes(store, shards) == (ok, fails)
    assert list(row_outcomes(store, shards)[1]) == list(fails)
    # the manifest's failures_by_reason, order included
    assert list(new.by_reason().items()) == list(dict(Counter(fails.values()).most_common()).items())
    # a version's totals: the removed rows count neither way (versions.next_version before)
    left_out = set(removed)
    kept = {rid: why for rid, why in fails.items() if rid not in left_out}
    v = new.without(np.array(sorted(removed), dtype=np.int64))
    assert v.n_ok == len(ok - left_out) and v.ok_ids().tolist() == sorted(ok - left_out)
    assert v.failed.tolist() == list(kept)
    assert list(v.by_reason().items()) == list(dict(Counter(kept.values()).most_common()).items())
    return new


def test_retries_repeats_and_ties_count_as_before(tmp_path):
    store = _shards(tmp_path, [
        [(0, "success", None), (1, "failed_to_download", "HTTP Error 404 http://a/1.jpg"),
         (2, "failed_to_download", "timed out http://a/2.jpg"), (3, "failed_to_download", "HTTP Error 404 http://a/3"),
         (4, "failed_to_download", None), (5, "failed_to_resize", "")],
        [(6, "failed_to_download", "timed out http://b/6.jpg"), (7, "success", None),
         (8, "failed_to_download", "HTTP Error 500 http://b/8"), (9, None, "odd \x1b[31m status")],
        # the retry shard: 1 succeeds now, 2 fails again with another reason, 4 with a message
        [(2, "failed_to_download", "HTTP Error 500 http://c/2"), (1, "success", None),
         (4, "failed_to_download", "timed out http://c/4"), (8, "failed_to_download", "HTTP Error 404 http://c/8")],
        [],
        # twice in one shard: 10 fails then succeeds; 11 fails with two reasons, the last one counts
        [(10, "failed_to_download", "HTTP Error 404 http://d/10"), (11, "failed_to_download", "x http://d/11"),
         (10, "success", None), (11, "failed_to_download", "timed out http://d/11")],
    ])
    new = _compare(store, removed=[3, 7, 100])
    # 2: first failed in shard 0, last reason from the retry; 1 succeeded in the retry
    assert new.ok_ids().tolist() == [0, 1, 7, 10]
    assert new.failed.tolist() == [2, 3, 4, 5, 6, 8, 9, 11]
    by = new.by_reason()
    # ties: 404 (3, and 8 by its retry) at 2, timed out (4, 6, 11) at 3; then 500 (2), unknown (5) and
    # the odd one (9) at 1 each: in the order of the reasons' first failed row
    assert list(by.items()) == [("timed out <url>", 3), ("HTTP Error 404 <url>", 2),
                                ("HTTP Error 500 <url>", 1), ("unknown", 1), ("odd \\x1b[31m status", 1)]


def test_no_shards_and_only_successes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    empty = _compare(Location(str(tmp_path / "a")))
    assert empty.n_ok == len(empty.failed) == 0 and empty.by_reason() == {}
    store = _shards(tmp_path / "b", [[(i, "success", None) for i in range(5)], [(2, "success", None)]])
    assert _compare(store, removed=[1]).by_reason() == {}


@pytest.mark.parametrize("seed", range(4))
def test_random_shards_with_retries_match_the_reference(tmp_path, seed):
    rnd = random.Random(seed)
    reasons = ["HTTP Error 404 http://x/{}", "timed out http://y/{}", "HTTP Error 500", None, "",
               "broken image {}"[:13], "HTTP Error 403 https://z/{}"]
    shards, n = [], 3000
    for s in range(6):  # 4 shards of new rows, then 2 retry rounds over some of them, unordered
        # retry rounds with repeats: a row id twice in one shard too
        ids = list(range(s * 750, (s + 1) * 750)) if s < 4 else rnd.choices(range(n), k=900)
        rows = []
        for rid in ids:
            if rnd.random() < 0.5 + 0.1 * s:
                rows.append((rid, "success", None))
            else:
                why = rnd.choice(reasons)
                rows.append((rid, rnd.choice(["failed_to_download", "failed_to_resize"]),
                             why.format(rid) if why else why))
        shards.append(rows)
    store = _shards(tmp_path, shards)
    _compare(store, removed=rnd.sample(range(n + 10), 400))
