"""YFCC15M join: subset list x YFCC100M metadata, streamed with bounded memory."""

from __future__ import annotations

import bz2
import gc
import gzip
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cloob.errors import CloobError
from cloob.prepare.yfcc import STAT_KEYS, Subset, clean_text, iter_yfcc_rows, load_subset_ids, make_caption

N_ROWS = 2000


def meta_line(line: int, pid: int, title: str = "", desc: str = "", *, url: str | None = None,
              marker: int = 0) -> str:
    """One metadata line in the real 25-column layout."""
    if url is None:
        url = f"http://farm1.staticflickr.com/1/{pid}_abc.jpg"
    cols = [str(line), str(pid), f"h{pid:x}", "12345@N00", "nick", "2010-01-01 10:00:00.0", "1262340000",
            "Canon+EOS", title, desc, "tag1,tag2", "", "2.35", "48.85", "16",
            f"http://www.flickr.com/photos/12345@N00/{pid}/", url, "Attribution License",
            "http://creativecommons.org/licenses/by/2.0/", "1", "1", "abc", "def", "jpg", str(marker)]
    assert len(cols) == 25
    return "\t".join(cols)


# Hand-picked rows: row index -> (title, desc, extra kwargs, expected caption or None if skipped).
SPECIAL = {
    3: ("Sunset+over+the+lake%2C+Norway", "", {}, "Sunset over the lake, Norway"),
    6: ("My+dog",
        "Taken+at+%3Ca+href%3D%22http%3A%2F%2Fx%22%3Elink%3C%2Fa%3E+%26amp%3B+more%3Cbr%3Eline+two", {},
        "My dog. Taken at link & more line two"),
    9: ("", "Only+a+description", {}, "Only a description"),
    12: ("100%+sure+%zz+%E2%82", "", {}, "100% sure %zz"),
    15: ("Same+text", "Same+text", {}, "Same text"),
    18: ("Hello!", "World", {}, "Hello! World"),
    21: ("", "", {}, None),                         # empty caption
    24: ("%3Cbr%3E", "+++", {}, None),              # empty after cleaning
    27: ("No+url", "", {"url": ""}, None),          # no download URL
    30: ("i+%3C3+it", "%26lt%3Bb%26gt%3B+Caf%C3%A9", {}, "i <3 it. <b> Café"),
    33: ('raw <a href="http://x">link</a> &amp; co', "", {}, "raw link & co"),
    36: ("A+video", "", {"marker": 1}, None),       # video
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small metadata file and subset list, plus the expected join result."""
    d = tmp_path_factory.mktemp("yfcc")
    rng = random.Random(0)
    ids = rng.sample(range(10_000, 10_000_000), N_ROWS)  # metadata is not sorted by photo id
    lines, videos = [], set()
    for i, pid in enumerate(ids):
        if i in SPECIAL:
            title, desc, kw, _ = SPECIAL[i]
            lines.append(meta_line(i, pid, title, desc, **kw))
            if kw.get("marker"):
                videos.add(pid)
            continue
        marker = 1 if i % 10 == 7 else 0
        if marker:
            videos.add(pid)
        lines.append(meta_line(i, pid, f"photo+number+{i}", f"desc+{i}" if i % 2 else "", marker=marker))
        if i % 250 == 0:  # malformed lines between good ones
            lines += ["too\tfew\tcolumns", meta_line(0, 1, "x").replace("\t1\t", "\tnot-an-id\t", 1), ""]
    n_malformed = sum(1 for i in range(N_ROWS) if i % 250 == 0 and i not in SPECIAL) * 2
    meta = "\n".join(lines) + "\n"

    subset_idx = sorted(set(range(0, N_ROWS, 3)) | set(SPECIAL))
    # (line, photo id): the line numbers are the metadata file's, as in OpenAI's list; plus ids that
    # are not in the metadata
    subset_rows = [(i, ids[i]) for i in subset_idx] + [(N_ROWS + k, p) for k, p in enumerate((5, 6, 7))]
    subset = "line\tphotoid\tphotohash\n" + "".join(f"{i}\t{p}\th{p:x}\n" for i, p in subset_rows)

    expected = {}
    for i in subset_idx:
        pid = ids[i]
        if i in SPECIAL:
            if SPECIAL[i][3] is not None:
                expected[pid] = SPECIAL[i][3]
        elif pid not in videos:
            expected[pid] = f"photo number {i}. desc {i}" if i % 2 else f"photo number {i}"

    for suffix, opener in (("", open), (".bz2", bz2.open), (".gz", gzip.open)):
        with opener(d / f"meta.tsv{suffix}", "wt") as f:
            f.write(meta)
        with opener(d / f"subset.tsv{suffix}", "wt") as f:
            f.write(subset)
    (d / "subset_noheader.tsv").write_text(subset.split("\n", 1)[1])
    return {"dir": d, "ids": ids, "subset_idx": subset_idx, "expected": expected, "videos": videos,
            "n_malformed": n_malformed, "n_lines": len(lines), "meta_lines": lines}


@pytest.mark.parametrize("suffix", ["", ".bz2", ".gz"])
def test_join_exact(dataset, suffix):
    d = dataset["dir"]
    stats: dict = {}
    rows = list(iter_yfcc_rows(str(d / f"subset.tsv{suffix}"), str(d / f"meta.tsv{suffix}"),
                               batch_lines=300, stats=stats))
    got = {r["photo_id"]: r["caption"] for r in rows}
    assert len(got) == len(rows)
    assert got == dataset["expected"]
    # file order is kept, and the other fields come from the right columns
    assert [r["line"] for r in rows] == sorted(r["line"] for r in rows)
    r = rows[0]
    assert r["url"] == f"http://farm1.staticflickr.com/1/{r['photo_id']}_abc.jpg"
    assert r["photo_hash"] == f"h{r['photo_id']:x}"
    assert dataset["ids"][r["line"]] == r["photo_id"]

    assert set(stats) == set(STAT_KEYS)
    videos_in_subset = sum(1 for i in dataset["subset_idx"] if dataset["ids"][i] in dataset["videos"])
    assert stats == {
        "lines_read": dataset["n_lines"],
        "matched": len(dataset["subset_idx"]),
        "yielded": len(dataset["expected"]),
        "skipped_video": videos_in_subset,
        "skipped_no_url": 1,
        "skipped_empty_caption": 2,
        "malformed": dataset["n_malformed"],
        "duplicates": 0,
        "line_mismatch": 0,
        "subset_ids": len(dataset["subset_idx"]) + 3,
    }


def test_subset_ids_header_or_not(dataset):
    d = dataset["dir"]
    want = np.array(sorted({dataset["ids"][i] for i in dataset["subset_idx"]} | {5, 6, 7}), dtype=np.int64)
    for name in ("subset.tsv", "subset.tsv.bz2", "subset_noheader.tsv"):
        got = load_subset_ids(str(d / name))
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


def test_subset_ids_dedup_and_array_input(tmp_path, dataset):
    p = tmp_path / "dup.tsv"
    p.write_text("1\t30\ta\n2\t10\tb\n3\t30\tc\n4\t20\td\n")
    np.testing.assert_array_equal(load_subset_ids(str(p)), [10, 20, 30])
    # an (unsorted) id array works in place of the subset URI
    d = dataset["dir"]
    ids = np.array([dataset["ids"][i] for i in dataset["subset_idx"]][::-1], dtype=np.int64)
    got = {r["photo_id"] for r in iter_yfcc_rows(ids, str(d / "meta.tsv"))}
    assert got == set(dataset["expected"])


@pytest.mark.parametrize("rule,caption", [
    ("title", "My dog"),
    ("description", "Taken at link & more line two"),
    ("title_description", "My dog. Taken at link & more line two"),
    ("longest", "Taken at link & more line two"),
])
def test_caption_rules(dataset, rule, caption):
    d = dataset["dir"]
    rows = {r["photo_id"]: r["caption"]
            for r in iter_yfcc_rows(str(d / "subset.tsv"), str(d / "meta.tsv"), rule)}
    assert rows[dataset["ids"][6]] == caption
    if rule == "title":  # description-only row has no title: skipped
        assert dataset["ids"][9] not in rows
    if rule == "description":
        assert rows[dataset["ids"][9]] == "Only a description"
        assert dataset["ids"][3] not in rows


def test_clean_text_and_make_caption():
    assert clean_text("a+b%2Cc") == "a b,c"
    assert clean_text("%E2%82%AC+5+%ZZ+%") == "€ 5 %ZZ %"
    assert clean_text("<p>one</p><p>two</p>") == "one two"
    assert clean_text("click+<b>here</b>.") == "click here."
    assert clean_text("x+<+y+>+z") == "x < y > z"
    assert clean_text("&lt;3+&amp;+&nbsp;++\t ok") == "<3 & ok"
    assert clean_text("") == ""
    assert make_caption("Same", "Same") == "Same"
    assert make_caption("Title", "") == "Title"
    assert make_caption("Done.", "More") == "Done. More"
    assert make_caption("ab", "cd", "longest") == "ab"
    with pytest.raises(CloobError):
        make_caption("a", "b", "tags")  # type: ignore[arg-type]


def test_through_s3(s3, dataset):
    d = dataset["dir"]
    s3.mkdir("yfcc-bucket")
    s3.put(str(d / "meta.tsv.bz2"), "yfcc-bucket/yfcc/yfcc100m_dataset.bz2")
    s3.put(str(d / "subset.tsv.bz2"), "yfcc-bucket/yfcc/yfcc100m_subset_data.tsv.bz2")
    rows = iter_yfcc_rows("s3://yfcc-bucket/yfcc/yfcc100m_subset_data.tsv.bz2",
                          "s3://yfcc-bucket/yfcc/yfcc100m_dataset.bz2", batch_lines=500, progress=True)
    assert {r["photo_id"]: r["caption"] for r in rows} == dataset["expected"]


def _write_big(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for start in range(0, n, 10_000):
            f.write("".join(meta_line(i, 1_000_000 + i, f"title+{i}", f"some+longer+description+{i}") + "\n"
                            for i in range(start, min(n, start + 10_000))))


def _peak(subset: np.ndarray, path: Path) -> tuple[int, int]:
    gc.collect()
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_yfcc_rows(subset, str(path), batch_lines=10_000))
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_bounded_memory(tmp_path):
    small, big = tmp_path / "small.tsv", tmp_path / "big.tsv"
    _write_big(small, 50_000)
    _write_big(big, 150_000)
    # every 7th photo is in the subset (so the larger file yields 3x the rows)
    subset = np.arange(1_000_000, 1_150_000, 7, dtype=np.int64)
    n_small, peak_small = _peak(subset, small)
    n_big, peak_big = _peak(subset, big)
    assert (n_small, n_big) == (len(range(0, 50_000, 7)), len(subset))
    print(f"peak traced memory: {peak_small / 2**20:.1f} MiB (50k lines), {peak_big / 2**20:.1f} MiB (150k)")
    assert peak_big <= 1.5 * peak_small + (1 << 20), (peak_small, peak_big)
    assert peak_big < big.stat().st_size / 2, peak_big  # the file is never held whole


def test_errors(tmp_path, dataset):
    d = dataset["dir"]
    subset = str(d / "subset.tsv")
    with pytest.raises(CloobError, match="not found"):
        iter_yfcc_rows(subset, str(tmp_path / "missing.bz2"))
    with pytest.raises(CloobError, match="not found"):
        load_subset_ids(str(tmp_path / "missing.tsv.bz2"))

    # the files swapped: the subset list passed as metadata, and the other way round
    with pytest.raises(CloobError, match=r"expected 25 or 23 tab-separated columns.*got 3.*swapped") as e:
        list(iter_yfcc_rows(subset, subset))
    assert "yfcc100m_dataset" in str(e.value)
    with pytest.raises(CloobError, match="looks like the YFCC100M metadata file"):
        load_subset_ids(str(d / "meta.tsv"))

    bad = tmp_path / "bad.tsv"
    bad.write_text("".join("\t".join(["x"] * 10) + "\n" for _ in range(1500)))
    with pytest.raises(CloobError, match="got 10") as e:
        next(iter_yfcc_rows(subset, str(bad)))
    assert "fix: pass one of: the Multimedia Commons SQLite database yfcc100m_dataset.sql" in str(e.value)

    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(CloobError, match="empty"):
        list(iter_yfcc_rows(subset, str(empty)))
    with pytest.raises(CloobError, match="is empty"):
        load_subset_ids(str(empty))

    truncated = tmp_path / "truncated.tsv.bz2"
    truncated.write_bytes((d / "meta.tsv.bz2").read_bytes()[:5000])
    with pytest.raises(CloobError, match="cannot read"):
        list(iter_yfcc_rows(subset, str(truncated)))

    with pytest.raises(CloobError, match="caption rule"):
        iter_yfcc_rows(subset, str(d / "meta.tsv"), "tags")  # type: ignore[arg-type]


def test_yfcc15m_spec_rows_as_prepare_reads_them(dataset):
    """The shipped yfcc15m spec, with --input and the subset overridden, gives the join's rows with
    the metadata line number as the stable row id (what `cloob prepare yfcc15m` writes)."""
    from collections import Counter

    from cloob.prepare.run import _with_input
    from cloob.prepare.sources import iter_rows
    from cloob.prepare.spec import load_spec

    d = dataset["dir"]
    spec = _with_input(load_spec("yfcc15m", [f"source.subset={d / 'subset.tsv.bz2'}"]), str(d / "meta.tsv.bz2"))
    counts: Counter = Counter()
    rows = list(iter_rows(spec, counts))
    line_of = {pid: i for i, pid in enumerate(dataset["ids"])}
    assert {int(r["source_key"].split(":")[1]): r["caption"] for r in rows} == dataset["expected"]
    assert all(r["row_id"] == line_of[int(r["source_key"].split(":")[1])] for r in rows)
    assert counts["kept"] == len(dataset["expected"]) == len(rows)


@pytest.mark.parametrize("junk", [b"ab\x1b[2J\x07cd\n", b"2\tx\x1b]0;title\x07y\th\n"], ids=["columns", "id"])
def test_a_junk_subset_line_is_not_echoed_raw(tmp_path, junk):
    """pyarrow's parse error quotes the offending line: its control bytes (ESC, BEL) must reach the
    message escaped, not raw."""
    subset = tmp_path / "subset.tsv"
    subset.write_bytes(b"1\t2\th\n" + junk + b"3\t4\th\n")
    with pytest.raises(CloobError, match="cannot parse") as e:
        load_subset_ids(str(subset))
    msg = str(e.value)
    assert all(ch.isprintable() or ch == "\n" for ch in msg), [ch for ch in msg if not ch.isprintable()]
    assert "\\x1b" in msg and "\\x07" in msg  # escaped, still there to see


# -- the three forms of the metadata ----------------------------------------------------------------

# The Multimedia Commons table's columns (the header row quoted in github.com/yukimasano/PASS/issues/4),
# which are also the original release's 23 fields, in order.
SQL_COLUMNS = ("photoid", "uid", "unickname", "datetaken", "dateuploaded", "capturedevice", "title", "description",
               "usertags", "machinetags", "longitude", "latitude", "accuracy", "pageurl", "downloadurl",
               "licensename", "licenseurl", "serverid", "farmid", "secret", "secretoriginal", "ext", "marker")


def to23(line: str) -> str:
    """A 25-column line as the original release has it: without the line number and the hash."""
    cols = line.split("\t")
    return "\t".join(cols[1:2] + cols[3:]) if len(cols) == 25 else line


def write_parts(d: Path, lines: list[str], bz2_parts=(1, 4, 7)) -> list[Path]:
    """The lines as the ten 23-column files yfcc100m_dataset-0..9 (some .bz2), in order of their content."""
    d.mkdir(parents=True, exist_ok=True)
    n = len(lines)
    paths = []
    for k in range(10):
        text = "".join(to23(ln) + "\n" for ln in lines[k * n // 10:(k + 1) * n // 10])
        path = d / (f"yfcc100m_dataset-{k}" + (".bz2" if k in bz2_parts else ""))
        with (bz2.open(path, "wt") if k in bz2_parts else open(path, "w")) as f:
            f.write(text)
        paths.append(path)
    return paths


def write_sqlite(path: Path, lines: list[str], *, typed: bool = True, seed: int = 0, repeat: int | None = None) -> Path:
    """The well-formed lines as the Multimedia Commons table, in a shuffled order (its own order is not
    the line order); `repeat`: a photo id given a second row."""
    import sqlite3

    rows = [to23(ln).split("\t") for ln in lines if ln.count("\t") == 24]
    random.Random(seed).shuffle(rows)
    if repeat is not None:
        rows.append(next(r for r in rows if r[0] == str(repeat)))
    types = {"photoid": " INTEGER", "marker": " INTEGER", "dateuploaded": " INTEGER"} if typed else {}
    con = sqlite3.connect(path)
    con.execute(f"CREATE TABLE yfcc100m_dataset ({', '.join(c + types.get(c, '') for c in SQL_COLUMNS)})")
    con.executemany(f"INSERT INTO yfcc100m_dataset VALUES ({', '.join('?' * len(SQL_COLUMNS))})", rows)
    con.commit()
    con.close()
    return path


@pytest.fixture(scope="module")
def forms(dataset, tmp_path_factory):
    """The fixture's metadata in each form: the 25-column file, the ten parts (given shuffled), SQLite."""
    d = tmp_path_factory.mktemp("forms")
    parts = write_parts(d / "parts", dataset["meta_lines"])
    shuffled = [str(p) for p in parts]
    random.Random(5).shuffle(shuffled)
    return {"tsv25": str(dataset["dir"] / "meta.tsv.bz2"), "parts": shuffled,
            "sqlite": str(write_sqlite(d / "yfcc100m_dataset.sql", dataset["meta_lines"])),
            "sqlite-untyped": str(write_sqlite(d / "untyped.sql", dataset["meta_lines"], typed=False, seed=1))}


@pytest.mark.parametrize("form", ["parts", "sqlite", "sqlite-untyped"])
def test_every_form_gives_the_same_rows(dataset, forms, form):
    """The Multimedia Commons SQLite database (refused before as "expected 25 tab-separated columns ...
    got 2") and the original ten parts (refused, the fix naming the file passed) give the 25-column
    file's rows: the same photos, captions, URLs and line numbers (the subset's)."""
    subset = str(dataset["dir"] / "subset.tsv")
    want_stats: dict = {}
    want = {r["photo_id"]: (r["line"], r["url"], r["caption"])
            for r in iter_yfcc_rows(subset, forms["tsv25"], stats=want_stats)}
    stats: dict = {}
    rows = list(iter_yfcc_rows(subset, forms[form], batch_lines=300, stats=stats))
    assert {r["photo_id"]: (r["line"], r["url"], r["caption"]) for r in rows} == want
    assert len(rows) == len(want) == len(dataset["expected"])
    assert all(r["photo_hash"] is None for r in rows)  # neither form has the hash
    same = ("matched", "yielded", "skipped_video", "skipped_no_url", "skipped_empty_caption", "subset_ids")
    assert {k: stats[k] for k in same} == {k: want_stats[k] for k in same}
    assert stats["duplicates"] == stats["line_mismatch"] == 0
    if form == "parts":  # given shuffled, read in their numbered order: the file order of the 25 columns
        assert [r["line"] for r in rows] == sorted(r["line"] for r in rows)
        assert stats["lines_read"] == want_stats["lines_read"] and stats["malformed"] == want_stats["malformed"]
    else:  # the table holds the well-formed rows only, in its own order
        assert stats["lines_read"] == sum(1 for ln in dataset["meta_lines"] if ln.count("\t") == 24)
        assert stats["malformed"] == dataset["n_malformed"] // 2  # the rows whose photo id is not a number
        assert [r["line"] for r in rows] != sorted(r["line"] for r in rows)


def test_a_photo_met_twice_gives_one_row(dataset, tmp_path):
    pid = dataset["ids"][3]
    db = write_sqlite(tmp_path / "dup.sql", dataset["meta_lines"], repeat=pid)
    stats: dict = {}
    rows = [r for r in iter_yfcc_rows(str(dataset["dir"] / "subset.tsv"), str(db), stats=stats)
            if r["photo_id"] == pid]
    assert len(rows) == 1 and stats["duplicates"] == 1


def test_the_subsets_line_numbers_are_the_row_ids(dataset, tmp_path):
    """Every form labels a photo with the subset list's line number; where the 25-column file's own
    column 0 says otherwise, the difference is counted, and the subset's number kept."""
    d = dataset["dir"]
    shifted = tmp_path / "shifted.tsv"
    shifted.write_text("".join(f"{1000 + i}\t{dataset['ids'][i]}\th\n" for i in dataset["subset_idx"]))
    for meta in (str(d / "meta.tsv"), str(tmp_path / "db.sql")):
        if meta.endswith(".sql"):
            write_sqlite(Path(meta), dataset["meta_lines"])
        stats: dict = {}
        rows = list(iter_yfcc_rows(str(shifted), meta, stats=stats))
        assert rows and all(r["line"] == 1000 + dataset["ids"].index(r["photo_id"]) for r in rows)
        assert stats["line_mismatch"] == (len(rows) if meta.endswith(".tsv") else 0)
    # A bare id array carries no line numbers: the 25-column file's own are used, the other forms refuse.
    ids = np.array([dataset["ids"][i] for i in dataset["subset_idx"]], dtype=np.int64)
    assert all(dataset["ids"][r["line"]] == r["photo_id"] for r in iter_yfcc_rows(ids, str(d / "meta.tsv")))
    with pytest.raises(CloobError, match="has no line numbers") as e:
        iter_yfcc_rows(ids, str(tmp_path / "db.sql"))
    assert "yfcc100m_subset_data" in e.value.fix


def test_what_no_form_fits_is_one_error_naming_the_forms(dataset, forms, tmp_path, s3):
    d = dataset["dir"]
    subset = str(d / "subset.tsv")

    def refused(meta, *words):
        with pytest.raises(CloobError) as e:
            iter_yfcc_rows(subset, meta)
        msg = str(e.value)
        assert all(w in msg for w in words), msg
        assert e.value.fix and "\n" not in e.value.problem
        return e.value

    junk = tmp_path / "junk.tsv"
    junk.write_text("a\tb\tc\td\te\tf\tg\n" * 20)
    err = refused(str(junk), "none of the YFCC100M metadata forms", "got 7 columns")
    assert all(w in err.fix for w in ("yfcc100m_dataset.sql", "yfcc100m_dataset-0..9", "23 tab-separated",
                                      "with 25"))
    packed = tmp_path / "yfcc100m_dataset.sql.bz2"
    packed.write_bytes(bz2.compress(Path(forms["sqlite"]).read_bytes()))
    assert "decompress it first" in refused(str(packed), "compressed SQLite database").fix
    s3.mkdir("yfcc-sql")
    s3.put(forms["sqlite"], "yfcc-sql/tools/etc/yfcc100m_dataset.sql")
    err = refused("s3://yfcc-sql/tools/etc/yfcc100m_dataset.sql", "SQLite database on remote storage",
                  "only local files")
    assert "download it first" in err.fix and "aws s3 cp" in err.fix
    refused([forms["parts"][0], forms["tsv25"]], "of different forms", "the original 23-column release",
            "the single 25-column file")
    part = Path(next(p for p in forms["parts"] if p.endswith("-4.bz2")))
    plain = tmp_path / "yfcc100m_dataset-4"
    plain.write_bytes(bz2.decompress(part.read_bytes()))
    refused([*forms["parts"], str(plain)], "part 4 of the original release is given more than once")
    refused([forms["sqlite"], forms["sqlite-untyped"]], "several SQLite databases")
    refused([forms["tsv25"], forms["tsv25"]], "given twice")

    import sqlite3

    other = tmp_path / "other.sql"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE photos (id INTEGER, url TEXT)")
    refused(str(other), "has no table 'yfcc100m_dataset'", "photos")
    narrow = tmp_path / "narrow.sql"
    with sqlite3.connect(narrow) as con:
        con.execute("CREATE TABLE yfcc100m_dataset (photoid INTEGER, title TEXT)")
    refused(str(narrow), "no column(s) description, downloadurl, marker")


def test_sqlite_is_streamed_in_bounded_memory(tmp_path):
    def write(path: Path, n: int) -> None:
        write_sqlite(path, [meta_line(i, 1_000_000 + i, f"title+{i}", f"some+longer+description+{i}")
                            for i in range(n)])

    small, big = tmp_path / "small.sql", tmp_path / "big.sql"
    write(small, 10_000)
    write(big, 30_000)
    ids = np.arange(1_000_000, 1_030_000, 7, dtype=np.int64)
    subset = Subset(ids, (ids - 1_000_000).astype(np.int32))
    peaks = []
    for path in (small, big):
        gc.collect()
        tracemalloc.start()
        try:
            n = sum(1 for _ in iter_yfcc_rows(subset, str(path), batch_lines=1_000))
            peaks.append((n, tracemalloc.get_traced_memory()[1]))
        finally:
            tracemalloc.stop()
    (n_small, peak_small), (n_big, peak_big) = peaks
    assert (n_small, n_big) == (len(range(0, 10_000, 7)), len(ids))
    assert peak_big <= 1.5 * peak_small + (1 << 20), peaks


def test_yfcc15m_spec_takes_each_form_and_several_inputs(dataset, forms, tmp_path):
    """`cloob prepare yfcc15m --input ...`: once for the database or the 25-column file, once per part
    for the original release; the rows `cloob prepare` writes (sorted by row id, their digest) are
    the same from each. Another source takes one --input only."""
    from cloob.cli import build_parser
    from cloob.prepare.run import _ensure_rows, _with_input
    from cloob.prepare.spec import load_spec
    from cloob.storage import Location

    spec = load_spec("yfcc15m", [f"source.subset={dataset['dir'] / 'subset.tsv.bz2'}"])
    argv = ["prepare", "yfcc15m", "--out", "o"] + [a for p in forms["parts"] for a in ("--input", p)]
    args = build_parser().parse_args(argv)
    assert args.input == forms["parts"]
    assert _with_input(spec, args.input).source.metadata == forms["parts"]
    assert _with_input(spec, [forms["sqlite"]]).source.metadata == forms["sqlite"]  # one input: as before
    digests = {}
    for form in ("tsv25", "parts", "sqlite"):
        s = _with_input(spec, forms[form])
        store = Location(str(tmp_path / form))
        store.makedirs("_cloob")
        info = _ensure_rows(store, s, s.content_hash(), progress=False)
        ids = pq.read_table(tmp_path / form / "_cloob" / "rows.parquet").column("row_id").to_pylist()
        assert ids == sorted(ids) and len(ids) == info["kept"] == len(dataset["expected"])
        digests[form] = info["sha256"]
    assert len(set(digests.values())) == 1, digests

    cc3m = load_spec("cc3m")
    with pytest.raises(CloobError, match="reads one file, and --input was given 2 times"):
        _with_input(cc3m, ["a.tsv", "b.tsv"])


# -- the same photos through `cloob prepare yfcc15m`: one content hash -------------------------------

PREP = ["download.processes=1", "download.threads=4", "download.timeout=5", "download.deadline=6",
        "download.retries=0", "download.image_size=32", "download.shard_size=5"]


def tiny_yfcc(d: Path, base_url: str, n: int = 24) -> dict:
    """n photos served by the test's image server, in the 25-column form (plain and .bz2), and a
    subset list holding every other one (with their real line numbers)."""
    from cloob.prepare.demo_server import render

    d.mkdir(parents=True, exist_ok=True)
    ids = [900_000 + 37 * i for i in range(n)]
    lines = [meta_line(i, pid, render(3, 48, 3, i)[1].replace(" ", "+"), url=f"{base_url}/3/48/3/{i}.jpg")
             for i, pid in enumerate(ids)]
    (d / "yfcc100m_dataset").write_text("\n".join(lines) + "\n")
    with bz2.open(d / "yfcc100m_dataset.bz2", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (d / "subset.tsv").write_text("".join(f"{i}\t{ids[i]}\th{ids[i]:x}\n" for i in range(0, n, 2)))
    parts = [str(p) for p in write_parts(d / "parts", lines)][::-1]
    return {"ids": ids, "lines": lines, "parts": parts,
            "sqlite": str(write_sqlite(d / "yfcc100m_dataset.sql", lines, seed=7))}


@pytest.mark.slow
def test_the_content_hash_is_the_same_for_the_same_rows_however_they_were_passed(tmp_path, image_server):
    """The same YFCC rows as .bz2 and as plain text under another name and folder, and from the SQLite
    database (whose rows come in another order): equal content hashes (README: equal hashes for equal
    datasets). The input's path was part of it."""
    from cloob.prepare.run import prepare
    from cloob.prepare.spec import load_spec

    a = tiny_yfcc(tmp_path / "a", image_server.url)
    other = tmp_path / "elsewhere" / "copy.tsv"
    other.parent.mkdir()
    other.write_bytes((tmp_path / "a" / "yfcc100m_dataset").read_bytes())
    spec = load_spec("yfcc15m", [f"source.subset={tmp_path / 'a' / 'subset.tsv'}", *PREP])
    got = {}
    # (the ten parts give the same rows and row digest as the others: test_yfcc15m_spec_takes_each_form...)
    for name, path in (("bz2", str(tmp_path / "a" / "yfcc100m_dataset.bz2")), ("plain, renamed", str(other)),
                       ("sqlite", a["sqlite"])):
        m = prepare(spec, str(tmp_path / f"out-{name}"), input=path, progress=False)
        assert m["totals"]["successes"] == 12 and m["rows"]["kept"] == 12, (name, m["totals"])
        got[name] = m["content_hash"]
    assert len(set(got.values())) == 1, got
