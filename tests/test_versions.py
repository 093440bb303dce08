"""Dataset versions (cloob.prepare.versions): a re-run fetches only new rows into a new version, keeps
the earlier ones readable, leaves removed rows out of training and can delete them for good.
Real img2dataset against the image server on 127.0.0.1; the HTTP requests are counted."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from cloob.cli import main as cli_main
from cloob.data.shards import list_shards
from cloob.data.stream import ShardStream
from cloob.errors import CloobError
from cloob.prepare.demo_server import render
from cloob.prepare.run import prepare, read_manifest
from cloob.prepare.spec import load_spec
from cloob.prepare.versions import resolve, source_unchanged, versions

FAST = {"processes": 1, "threads": 8, "timeout": 5, "deadline": 6, "retries": 0, "image_size": 16,
        "shard_size": 8, "max_image_area": 1.0e6, "max_bytes": 200_000}


def rows(base: str, ids, prefix: str = "") -> list[tuple[str, str]]:
    """Rows whose captions name them (`row 7: ...`), so a sample says which row it is."""
    return [(f"{base}{prefix}/3/24/1/{i}.jpg", f"row {i}: {render(3, 24, 1, i)[1]}") for i in ids]


def write(path: Path, items: list[tuple[str, str]], key: list[str] | None = None) -> Path:
    head = "url\tcaption" + ("\tid" if key else "")
    lines = [f"{u}\t{c}" + (f"\t{key[n]}" if key else "") for n, (u, c) in enumerate(items)]
    path.write_text("\n".join([head, *lines]) + "\n")
    return path


def spec(path, **source) -> object:
    return load_spec({"name": "t", "source": {"kind": "table", "path": str(path), **source}, "download": FAST})


def fetched(server) -> list[int]:
    """The row numbers the server was asked for, and forget them."""
    out = sorted(int(p.rsplit("/", 1)[1].split(".")[0]) for p in server.httpd.requests)
    server.httpd.requests.clear()
    return out


def captions_in_shards(folder: Path) -> set[int]:
    out = set()
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as t:
            out |= {int(t.extractfile(m).read().decode().split(":")[0][4:]) for m in t.getmembers()
                    if m.name.endswith(".txt")}
    return out


def stream_rows(data_train: str, n: int) -> list[int]:
    """The first n samples that training reads from data_train, as row numbers, in order."""
    s = list_shards(data_train)
    stream = ShardStream(s.urls, batch_size=1, image_transform=lambda im: torch.zeros(1), tokenizer=lambda t: t,
                         seed=3, resampled=False, shuffle_buffer=5, exclude_keys=s.exclude_keys,
                         expected_counts=dict(zip(s.urls, s.counts)))
    out = []
    for batch in stream:
        out.append(int(batch["text"][0].split(":")[0][4:]))
        if len(out) == n:
            return out
    return out


@pytest.mark.slow
def test_a_grown_table_fetches_only_its_new_rows_into_a_new_version(tmp_path, image_server):
    """Also the pipeline's already-done key (cloob.run.state.prepared): the flow's prepare task is
    Skipped only while the source is as its newest version read it: rows appended to the table make it
    prepare again (a new version of only the new rows)."""
    from cloob.run.state import prepared

    url = image_server.url
    table = write(tmp_path / "rows.tsv", rows(url, range(20)))
    out = tmp_path / "ds"
    assert prepared(spec(table), str(out)) is None  # nothing prepared yet
    m1 = prepare(spec(table), str(out), progress=False)
    assert fetched(image_server) == list(range(20)) and "version" not in m1
    first = prepared(spec(table), str(out))
    assert first is not None
    v1_bytes = (out / "_cloob" / "manifest.json").read_bytes()

    # Unchanged: a no-op that says so; the files' sizes and times say it without reading them.
    assert source_unchanged(spec(table), str(out))
    again = prepare(spec(table), str(out), progress=False)
    assert again["run"]["noop"] and "no new rows since version 1" in again["run"]["message"]
    assert fetched(image_server) == [] and (out / "_cloob" / "manifest.json").read_bytes() == v1_bytes
    table.write_text(table.read_text())  # touched: read again, and still nothing new
    assert not source_unchanged(spec(table), str(out))
    again = prepare(spec(table), str(out), progress=False)
    assert again["run"]["message"] == "nothing to do: no new rows since version 1"
    assert fetched(image_server) == [] and (out / "_cloob" / "manifest.json").read_bytes() == v1_bytes

    # 6 rows appended: only they are fetched, into shards after the last.
    write(table, rows(url, range(26)))
    assert prepared(spec(table), str(out)) is None  # grown: not "already done"
    m2 = prepare(spec(table), str(out), progress=False)
    assert fetched(image_server) == list(range(20, 26))
    assert prepared(spec(table), str(out)) not in (None, first)
    assert m2["version"] == 2 and m2["rows_added"] == 6 and m2["rows_removed"] == 0
    assert m2["totals"]["samples"] == 26 and m2["totals"]["rows"] == 26
    assert [e["shard"] for e in m2["shards"]] == [f"{i:05d}.tar" for i in range(4)]  # 20 rows: 3, then 1
    assert m2["history"][-1]["mode"] == "new-rows" and m2["history"][-1]["rows"] == 6
    assert m2["content_hash"] != m1["content_hash"]
    # version 1 kept as it was; the folder's manifest is version 2's
    v1 = json.loads((out / "_cloob" / "versions" / "v1.json").read_text())
    assert v1["content_hash"] == m1["content_hash"] and v1["shards"] == m1["shards"]
    assert read_manifest(str(out))["content_hash"] == m2["content_hash"]
    assert list_shards(str(out)).num_samples == 26 and list_shards(f"{out}@v1").num_samples == 20
    assert [v["version"] for v in versions(str(out))] == [1, 2]
    assert resolve(f"{out}@v1")["content_hash"] == m1["content_hash"]
    assert resolve(str(out))["content_hash"] == m2["content_hash"] and resolve(str(out))["version"] == 2

    # The CLI says so on the next run.
    assert cli_main(["prepare", _spec_file(tmp_path, table), "--out", str(out), "--no-progress"]) == 0
    assert fetched(image_server) == []
    with pytest.raises(CloobError, match="versions there: v1, v2"):
        list_shards(f"{out}@v7")


def _train_two_steps_and_capture_excluded(tmp_path: Path, data: str, monkeypatch) -> set[str]:
    """The exclude_keys the training loop gives its ShardStream for `data` (2 steps of the tiny recipe)."""
    import cloob.train.loop as loop
    from cloob.config import load_recipe

    seen: list[frozenset] = []

    class Recording(ShardStream):
        def __init__(self, *a, **k):
            seen.append(frozenset(k.get("exclude_keys") or ()))
            super().__init__(*a, **k)

    monkeypatch.setattr(loop, "ShardStream", Recording)
    loop.train(load_recipe("tiny", [f"data.train={data}", f"train.output={tmp_path / 'runs'}", "train.steps=2",
                                    "train.batch_size=4", "data.workers=0", "train.progress=false",
                                    "model.arch=cloob-tiny-rn"]))
    assert len(seen) == 1
    return set(seen[0])


def _spec_file(tmp_path: Path, table: Path, **source) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"name": "t", "source": {"kind": "table", "path": str(table), **source},
                                "download": FAST}))
    return str(path)


@pytest.mark.slow
def test_removed_rows_leave_training_and_old_versions_stay_as_they_were(tmp_path, image_server, capsys,
                                                                        monkeypatch):
    url = image_server.url
    table = write(tmp_path / "rows.tsv", rows(url, range(24)))
    out = tmp_path / "ds"
    prepare(spec(table), str(out), progress=False)
    fetched(image_server)
    v1_stream = stream_rows(str(out), 40)
    assert set(v1_stream) == set(range(24))

    # Rows 3 and 17 taken down, two new ones: version 2 holds 24 rows, not those two.
    write(table, rows(url, [i for i in range(26) if i not in (3, 17)]))
    m2 = prepare(spec(table), str(out), progress=False)
    assert fetched(image_server) == [24, 25]
    assert (m2["rows_added"], m2["rows_removed"], m2["removed_row_ids"]) == (2, 2, [3, 17])
    assert len(m2["excluded_keys"]) == 2 and m2["totals"]["samples"] == 24
    t = m2["totals"]
    assert (t["attempted"], t["successes"], t["failures"], t["success_rate"]) == (24, 24, 0, 1.0)
    seen = stream_rows(str(out), 60)
    assert 3 not in seen and 17 not in seen and set(seen) == set(range(26)) - {3, 17}
    assert list_shards(str(out)).num_samples == 24
    # cloob train on version 2 hands the version's left-out samples to its stream
    assert _train_two_steps_and_capture_excluded(tmp_path, str(out), monkeypatch) == set(m2["excluded_keys"])

    # Version 3 (more rows); version 1 reads the same samples in the same order as before both.
    write(table, rows(url, [i for i in range(30) if i not in (3, 17)]))
    m3 = prepare(spec(table), str(out), progress=False)
    assert m3["version"] == 3 and fetched(image_server) == [26, 27, 28, 29]
    assert stream_rows(f"{out}@v1", 40) == v1_stream
    assert stream_rows(str(out / "_cloob" / "versions" / "v1.json"), 40) == v1_stream
    v2_stream = stream_rows(f"{out}@v2", 60)
    assert v2_stream == seen

    # Deleted for good: gone from the tars; every version reads what it read before, minus them.
    assert {3, 17} <= captions_in_shards(out)
    import cloob.prepare.purge as v

    def killed(*a, **k):  # the first shard's tar and parquet rewritten, its stats file not yet
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(v, "_level_stats", killed)
        with pytest.raises(KeyboardInterrupt):
            v.purge_removed(str(out))
    assert cli_main(["prepare", _spec_file(tmp_path, table), "--out", str(out), "--purge-removed",
                     "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "deleted 2 samples of rows removed from the source from 2 shards" in said, said
    assert not {3, 17} & captions_in_shards(out)
    assert stream_rows(f"{out}@v2", 60) == v2_stream
    assert list_shards(f"{out}@v2").num_samples == 24 and list_shards(str(out)).num_samples == 28
    v1_after = stream_rows(f"{out}@v1", 40)
    assert 3 not in v1_after and 17 not in v1_after
    assert list_shards(f"{out}@v1").num_samples == 22
    assert fetched(image_server) == []
    # A purge again has nothing to do.
    assert cli_main(["prepare", _spec_file(tmp_path, table), "--out", str(out), "--purge-removed",
                     "--no-progress"]) == 0
    assert "no samples of removed rows are left in the shards" in capsys.readouterr().out


@pytest.mark.slow
def test_row_identity_survives_a_reexport_reordered_and_renamed(tmp_path, image_server):
    url = image_server.url
    items = rows(url, range(16))
    ids = [f"id-{i}" for i in range(16)]
    out, keyed = tmp_path / "ds", tmp_path / "keyed"
    prepare(spec(write(tmp_path / "a.tsv", items)), str(out), progress=False)
    prepare(spec(write(tmp_path / "k.tsv", items, ids), key="id"), str(keyed), progress=False)
    fetched(image_server)
    order = list(reversed(range(16)))
    # url + caption: the same rows in another order, in a file of another name
    m = prepare(spec(write(tmp_path / "b.tsv", [items[i] for i in order])), str(out), progress=False)
    assert m["run"]["message"] == "nothing to do: no new rows since version 1" and fetched(image_server) == []
    # a key column: reordered, renamed, and the urls moved to another host path
    moved = [(u.replace("/3/24/1/", "/flaky/3/24/1/"), c) for u, c in items]
    m = prepare(spec(write(tmp_path / "k2.tsv", [moved[i] for i in order], [ids[i] for i in order]), key="id"),
                str(keyed), progress=False)
    assert m["run"]["message"] == "nothing to do: no new rows since version 1" and fetched(image_server) == []
    # ... and a new key is a new row, wherever it stands
    with_new = [*moved[:5], rows(url, [40])[0], *moved[5:]]
    m = prepare(spec(write(tmp_path / "k3.tsv", with_new, [*ids[:5], "id-new", *ids[5:]]), key="id"),
                str(keyed), progress=False)
    assert m["version"] == 2 and m["rows_added"] == 1 and fetched(image_server) == [40]
    # a changed spec is still another dataset
    with pytest.raises(CloobError, match="different spec"):
        prepare(load_spec({"name": "t", "source": {"kind": "table", "path": str(tmp_path / "b.tsv")},
                           "download": {**FAST, "image_size": 20}}), str(out), progress=False)


@pytest.mark.slow
def test_a_glob_of_daily_dumps(tmp_path, image_server):
    url = image_server.url
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    write(dumps / "2026-12-05.tsv", rows(url, range(10)))
    write(dumps / "2026-12-06.tsv", rows(url, range(10, 14)))
    out = tmp_path / "ds"
    m1 = prepare(spec(dumps / "*.tsv"), str(out), progress=False)
    assert m1["totals"]["successes"] == 14 and fetched(image_server) == list(range(14))
    write(dumps / "2026-12-07.tsv", rows(url, range(14, 19)))
    m2 = prepare(spec(dumps / "*.tsv"), str(out), progress=False)
    assert m2["version"] == 2 and m2["rows_added"] == 5 and fetched(image_server) == list(range(14, 19))
    assert list_shards(str(out)).num_samples == 19
    # the oldest dump pruned from the folder: its rows leave the next version
    (dumps / "2026-12-05.tsv").unlink()
    m3 = prepare(spec(dumps / "*.tsv"), str(out), progress=False)
    assert m3["rows_removed"] == 10 and m3["totals"]["samples"] == 9 and fetched(image_server) == []
    assert set(stream_rows(str(out), 30)) == set(range(10, 19))
    # an export that came out empty makes no version
    for p in dumps.iterdir():
        p.unlink()
    with pytest.raises(CloobError, match="no table matches"):
        prepare(spec(dumps / "*.tsv"), str(out), progress=False)
    write(dumps / "2026-12-08.tsv", [])
    with pytest.raises(CloobError, match="gave no usable rows this time"):
        prepare(spec(dumps / "*.tsv"), str(out), progress=False)
    assert read_manifest(str(out))["version"] == 3 and not list((out / "_cloob").glob(".tmp*"))


def test_a_version_that_does_not_exist_is_named(tmp_path, shards_dir):
    with pytest.raises(CloobError, match="no manifest.json"):
        list_shards(f"{shards_dir}@v1")
    # a folder of shards that cloob prepare did not make is read as before
    assert list_shards(str(shards_dir)).version is None


@pytest.mark.slow
def test_versions_in_a_bucket_from_a_prefix_of_dumps(s3, image_server):
    """The same on S3 (a moto server on 127.0.0.1): dumps under a bucket prefix, the dataset in the
    bucket, the sizes and ETags telling an unchanged prefix without reading it."""
    url = image_server.url
    s3.mkdir("vbucket")

    def dump(name: str, ids) -> None:
        s3.pipe(f"vbucket/dumps/{name}", ("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in rows(url, ids)))
                .encode())

    dump("2026-12-06.tsv", range(9))
    out = "s3://vbucket/datasets/t"
    the_spec = spec("s3://vbucket/dumps/*.tsv")
    m1 = prepare(the_spec, out, progress=False)
    assert m1["totals"]["successes"] == 9 and fetched(image_server) == list(range(9))
    assert source_unchanged(the_spec, out)
    dump("2026-12-07.tsv", range(9, 12))
    assert not source_unchanged(the_spec, out)
    m2 = prepare(the_spec, out, progress=False)
    assert m2["version"] == 2 and fetched(image_server) == [9, 10, 11]
    again = prepare(the_spec, out, progress=False)
    assert again["run"]["noop"] and "no new rows since version 2" in again["run"]["message"]
    assert list_shards(f"{out}@v1").num_samples == 9 and list_shards(out).num_samples == 12
    assert [v["version"] for v in versions(out)] == [1, 2]
    assert set(stream_rows(f"{out}@v1", 20)) == set(range(9))


@pytest.mark.slow
def test_a_version_killed_before_or_after_its_download_resumes(tmp_path, image_server, monkeypatch):
    """Killed after the new rows got their ids but before img2dataset ran, then after the version's
    JSON but before the folder's manifest: each rerun ends where an unbroken run ends, fetching every
    new row once."""
    import cloob.prepare.run as run
    import cloob.prepare.versions as v

    url = image_server.url
    table = write(tmp_path / "rows.tsv", rows(url, range(10)))
    out = tmp_path / "ds"
    prepare(spec(table), str(out), progress=False)
    fetched(image_server)
    write(table, rows(url, range(14)))

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(run, "run_round", killed)
        with pytest.raises(KeyboardInterrupt):
            prepare(spec(table), str(out), progress=False)
    assert (out / "_cloob" / "keys" / "001.parquet").exists() and not (out / "_cloob" / "versions").exists()
    assert fetched(image_server) == []
    write(table, rows(url, [*range(14), 20]))  # and one more row meanwhile
    original = v.write_json

    def dies_at_the_manifest(store, rel, data):
        if rel.endswith("manifest.json") and data.get("version") == 2:
            raise KeyboardInterrupt
        original(store, rel, data)

    with monkeypatch.context() as mp:
        mp.setattr(v, "write_json", dies_at_the_manifest)
        with pytest.raises(KeyboardInterrupt):
            prepare(spec(table), str(out), progress=False)
    assert fetched(image_server) == [10, 11, 12, 13, 20]
    assert "version" not in read_manifest(str(out))  # still version 1's
    again = prepare(spec(table), str(out), progress=False)
    assert again["run"]["noop"] and fetched(image_server) == []
    m = read_manifest(str(out))
    assert m["version"] == 2 and m["rows_added"] == 5 and m["totals"]["samples"] == 15
    assert json.loads((out / "_cloob" / "versions" / "v2.json").read_text()) == m
    assert sorted(set(stream_rows(str(out), 30))) == [*range(14), 20]


@pytest.mark.slow
def test_yfcc_is_matched_by_photo_id_across_its_forms(tmp_path, image_server):
    """YFCC15M: a dataset made from the .bz2 file, read again from the SQLite database (another form,
    another order, another path): the same photos, no new version, nothing fetched."""
    from tests.test_yfcc import PREP, tiny_yfcc

    a = tiny_yfcc(tmp_path / "a", image_server.url)
    the_spec = load_spec("yfcc15m", [f"source.subset={tmp_path / 'a' / 'subset.tsv'}", *PREP])
    out = str(tmp_path / "ds")
    m1 = prepare(the_spec, out, input=str(tmp_path / "a" / "yfcc100m_dataset.bz2"), progress=False)
    assert m1["totals"]["successes"] == 12
    image_server.httpd.requests.clear()
    again = prepare(the_spec, out, input=a["sqlite"], progress=False)
    assert again["run"]["message"] == "nothing to do: no new rows since version 1"
    assert image_server.httpd.requests == [] and read_manifest(out)["content_hash"] == m1["content_hash"]


def _old_match(source_file: str, known, tried: set[int], ok: set[int], retry_failed: bool):
    """The whole-table match the versions made before the matching was partitioned (every row's
    digests in memory, one hash join, one sort): (ids, pending, removed, rows digest, new keys)."""
    import hashlib

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cloob.prepare.identity import as_u64, key_array, with_occurrence

    t = pq.read_table(source_file, columns=["key", "content"])
    keys = with_occurrence(as_u64(t["key"].combine_chunks().buffers()[1].to_pybytes()[:16 * len(t)]))
    content = as_u64(t["content"].combine_chunks().buffers()[1].to_pybytes()[:16 * len(t)])
    idx = pc.index_in(key_array(keys), value_set=known["key"])
    matched = idx.is_valid().to_numpy(zero_copy_only=False)
    ids = np.full(len(keys), -1, dtype=np.int64)
    ids[matched] = known["row_id"].take(pc.drop_null(idx)).to_numpy(zero_copy_only=False)
    fresh = np.flatnonzero(~matched)
    known_ids = known["row_id"].to_numpy(zero_copy_only=False)
    ids[fresh] = np.arange(known_ids.max() + 1, known_ids.max() + 1 + len(fresh))
    pending = ~np.isin(ids, list(tried))
    if retry_failed:
        pending |= np.isin(ids, list(tried)) & ~np.isin(ids, list(ok))
    order = np.argsort(ids, kind="stable")
    digest = hashlib.sha256(ids[order].astype("<i8").tobytes() + content[order].astype("<u8").tobytes())
    return ids, pending, np.setdiff1d(known_ids, ids), digest.hexdigest(), (key_array(keys[fresh]), ids[fresh])


@pytest.mark.parametrize("retry_failed", [False, True])
def test_the_match_in_many_partitions_is_the_whole_tables(tmp_path, monkeypatch, retry_failed):
    """The re-read source matched partition by partition (tiny partitions, source batches and
    buckets, so every step runs over many of them) gives every row the row id, the rows to fetch,
    the removed rows, the rows' digest and the files that the whole-table match gave: rows listed
    twice or three times (matched in order, across partitions), keyed and unkeyed, known rows gone."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import cloob.prepare.matching as matching
    import cloob.prepare.versions as v
    from cloob.prepare.identity import KEY_SCHEMA, KEYS, digest16, identity, key_array, with_occurrence
    from cloob.storage import Location

    def table(ids):
        return [(f"https://h.example/{i % 23}.jpg", f"caption {i % 23}" if i % 3 else f"c {i}") for i in ids]

    v1 = table(range(60))  # rows 0..59; several of them the same url and caption
    store = Location(str(tmp_path / "ds"))
    (tmp_path / "ds" / "_cloob").mkdir(parents=True)
    pq.write_table(pa.table({"row_id": pa.array(range(60), pa.int64()), "url": [u for u, _ in v1],
                             "caption": [c for _, c in v1], "source_key": [f"line:{i + 1}" for i in range(60)]}),
                   tmp_path / "ds" / "_cloob" / "rows.parquet")
    grown = [*v1[5:40], *table(range(60, 90)), *v1[45:], *table([7, 7, 8])]  # 10 gone, duplicates, new rows
    tsv = write(tmp_path / "rows.tsv", grown)
    the_spec = spec(tsv)

    def run(partition_rows: int, batch: int):
        for mod in (matching, v):
            monkeypatch.setattr(mod, "BATCH", batch)
        monkeypatch.setattr(matching, "PARTITION_ROWS", partition_rows)
        for f in (tmp_path / "ds" / "_cloob").glob("keys/*"):
            f.unlink()
        folder = str(tmp_path / "ds" / "_cloob")
        src, n, _ = v._read_source(the_spec, folder, False)
        names = matching.key_files(store, folder)
        first = (tmp_path / "ds" / "_cloob" / "keys" / "000.parquet").read_bytes()
        tried = set(range(0, 60, 2)) | {65}
        ok = set(range(0, 60, 4))
        flags = [np.isin(np.arange(70), list(s)) for s in (tried, ok)]
        with matching.Match(store, src, n, folder) as m:
            m.run(*flags, retry_failed)
            digest, added, top = m.digest(59)
            fresh = pq.read_table(m.fresh_file)
            delta = pq.read_table(m.delta_file)
            files = (first, open(m.fresh_file, "rb").read(), open(m.delta_file, "rb").read())
            out = (m.removed.tolist(), m.n_fresh, m.n_pending, m.new_rows, digest, added, top)
        assert names == [f"{KEYS}/000.parquet"] and not list((tmp_path / "ds" / "_cloob").glob(".tmp-match-*"))
        return src, tried, ok, out, fresh, delta, files

    src, tried, ok, small, fresh, delta, files = run(2, 4)
    # version 1's keys: the rows file's identities, occurrences counted over the whole file
    rows = pq.read_table(tmp_path / "ds" / "_cloob" / "rows.parquet").to_pylist()
    keys = np.frombuffer(b"".join(digest16(identity(r)) for r in rows), dtype=np.uint64).reshape(-1, 2)
    known = pa.table({"key": key_array(with_occurrence(keys)), "row_id": pa.array(range(60), pa.int64())},
                     schema=KEY_SCHEMA)
    assert pq.read_table(pa.BufferReader(files[0])).equals(known)
    ids, pending, removed, digest, (fresh_keys, fresh_ids) = _old_match(src, known, tried, ok, retry_failed)
    new_rows = bool((pending & ~np.isin(ids, list(tried))).any())
    assert small == (removed.tolist(), len(fresh_ids), int(pending.sum()), new_rows, digest, int((ids > 59).sum()),
                     int(ids.max()))
    assert fresh.equals(pa.table({"key": fresh_keys, "row_id": pa.array(fresh_ids)}, schema=KEY_SCHEMA))
    source = pq.read_table(src)
    assert delta.column("row_id").to_pylist() == ids[pending].tolist()
    assert delta.column("url").to_pylist() == source["url"].filter(pa.array(pending)).to_pylist()
    assert len(set(grown)) < len(grown) and len(removed) and len(fresh_ids) and pending.any() and not pending.all()
    # one partition: the same, and the files byte for byte as the whole-table code wrote them
    src, *_, one, fresh1, delta1, files1 = run(1 << 18, 65536)
    assert (one, fresh1, delta1, files1[:2]) == (small, fresh, delta, files[:2])
    assert files1[2] == _old_delta_rows(tmp_path / "old-delta.parquet", src, np.flatnonzero(pending), ids)


def _old_delta_rows(path, source_file, positions, ids) -> bytes:
    """The url list of an extend round as the whole-table code wrote it (run.py's _write_delta_rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cloob.prepare.run import ROW_SCHEMA

    wanted = np.zeros(len(ids), dtype=bool)
    wanted[positions] = True
    with pq.ParquetWriter(path, ROW_SCHEMA) as writer:
        at = 0
        for batch in pq.ParquetFile(source_file).iter_batches(batch_size=65536):
            mask = wanted[at:at + batch.num_rows]
            if mask.any():
                t = pa.Table.from_batches([batch]).filter(pa.array(mask))
                t = t.append_column("row_id", pa.array(ids[at:at + batch.num_rows][mask], pa.int64()))
                writer.write_table(t.select(ROW_SCHEMA.names).cast(ROW_SCHEMA))
            at += batch.num_rows
    return path.read_bytes()


@pytest.mark.slow
def test_a_version_matched_in_many_partitions_is_the_same_version(tmp_path, image_server, monkeypatch):
    """`cloob prepare` on a grown table (rows gone, rows listed twice, new rows) with the matching
    forced through many tiny partitions makes the version that one partition makes: the same rows
    fetched, row ids, removed rows, left-out samples and content hash."""
    import cloob.prepare.matching as matching

    url = image_server.url
    v1 = rows(url, range(24))
    grown = [*v1[:3], *v1[4:17], *v1[18:], *rows(url, range(24, 30)), v1[5], v1[5], v1[9]]
    # Version 1 is prepared once and copied: a first version matches nothing (the matching, and
    # PARTITION_ROWS with it, runs only when the source is read again).
    table = write(tmp_path / "rows.tsv", v1)
    prepare(spec(table), str(tmp_path / "v1"), progress=False)
    assert fetched(image_server) == list(range(24))
    write(table, grown)
    made = []
    for partition_rows in (1 << 18, 2):
        monkeypatch.setattr(matching, "PARTITION_ROWS", partition_rows)
        out = tmp_path / f"ds-{partition_rows}"
        shutil.copytree(tmp_path / "v1", out)
        m = prepare(spec(table), str(out), progress=False)
        made.append((fetched(image_server), m["content_hash"], m["rows"]["sha256"], m["removed_row_ids"],
                     m["excluded_keys"], m["rows_added"], m["totals"]["samples"],
                     [f.read_bytes() for d in ("keys", "retry") for f in sorted((out / "_cloob" / d).iterdir())]))
    assert made[0][:7] == ([5, 5, 9, 24, 25, 26, 27, 28, 29], *made[0][1:3], [3, 17], *made[0][4:5], 9, 31)
    assert made[1] == made[0]


@pytest.mark.slow
def test_a_damaged_version_file_is_named_restored_from_its_copy_or_refused(tmp_path, image_server, capsys):
    """Fault round (issue 27): a version's JSON truncated or overwritten. The newest version's file has
    a copy (_cloob/manifest.json): `cloob prepare` restores it and says so; a damaged manifest.json is
    rebuilt from the newest version. An older version's file has none: training on it is refused,
    naming the file, and the newest version still trains. Never a traceback, never a silent guess."""
    url = image_server.url
    table = write(tmp_path / "rows.tsv", rows(url, range(16)))
    out = tmp_path / "ds"
    prepare(spec(table), str(out), progress=False)
    write(table, rows(url, range(24)))
    prepare(spec(table), str(out), progress=False)
    write(table, rows(url, range(32)))
    prepare(spec(table), str(out), progress=False)
    fetched(image_server)
    vdir = out / "_cloob" / "versions"
    v3, manifest = (vdir / "v3.json").read_bytes(), (out / "_cloob" / "manifest.json").read_bytes()
    spec_file = tmp_path / "t.yaml"
    spec_file.write_text(json.dumps({"name": "t", "source": {"kind": "table", "path": str(table)}, "download": FAST}))
    argv = ["prepare", str(spec_file), "--out", str(out), "--no-progress"]

    (vdir / "v3.json").write_bytes(v3[: len(v3) // 2])  # the newest, truncated
    capsys.readouterr()
    assert cli_main(argv) == 0
    said = capsys.readouterr()
    assert "v3.json was damaged" in said.out + said.err and (vdir / "v3.json").read_bytes() == v3
    assert fetched(image_server) == []

    (out / "_cloob" / "manifest.json").write_bytes(b"\x00junk")
    assert cli_main(argv) == 0
    assert (out / "_cloob" / "manifest.json").read_bytes() == manifest

    (vdir / "v2.json").write_bytes(b"")  # an older one: no copy
    with pytest.raises(CloobError) as e:
        list_shards(f"{out}@v2")
    assert "v2.json is damaged" in e.value.problem and "backup" in e.value.fix
    assert list_shards(f"{out}@v3").content_hash == json.loads(v3)["content_hash"]
    assert cli_main(["prepare", str(spec_file), "--out", str(out), "--no-progress"]) == 0  # the newest is whole
