"""Incremental preparation: a 1% delta (a new dataset version) against a full preparation of the same table.

    full:         python -m cloob.cli prepare <spec> --out NEW --no-progress        (N + N/100 rows)
    incremental:  the same command on a folder holding version 1 (the first N rows), after the
                  N/100 new rows were appended to the table: it reads the whole table again, matches
                  the rows with the known ones, fetches only the new rows into new shards and writes
                  version 2 (cloob.prepare.versions)
    re-read:      the same command once more with the table touched (size kept, time changed), so the
                  source is read and matched again and nothing is fetched: the fixed part of the
                  incremental cost

Goal: the incremental run costs in proportion to the new rows, plus the re-read of the table. The
rows are generated pictures served from one local HTTP server in this process (cloob.prepare.demo_server,
every picture rendered into its cache first); runs are fresh subprocesses, sequential, the order of
full and incremental alternating by round; medians are reported with the ratio incremental / full.

With --match-rows N[,N...] it measures the fixed part at scale instead, without downloads: a table of N
rows as version 1's rows file and N + N/100 rows as the grown table, then, in a fresh process, the first
version's identities (made once, on the first re-read of a dataset made before versions existed), the
streamed re-read of the table, the match and the rows' digest, with the process's peak memory after each;
each size in turn. It writes the section
"Incremental preparation: re-reading the source at scale".

With --outcome-rows N[,N...] it measures the row outcomes that build_manifest, a version's totals and a
retry round count (cloob.prepare.manifest.read_outcomes), against the per-row Python sets and dict they
replaced, over img2dataset-like shard parquet files of N rows (10,000 a shard, 30% failed, every failed
row retried in later shards, a third of them successfully): each in a fresh process, the peak memory and
time. It writes the subsection "Row outcomes at scale" of the same section (and --match-rows keeps it).

Usage: python bench/bench_versions.py [--samples 20000] [--delta 0.01] [--shard-size 500]
                                      [--processes 2] [--threads 32] [--repeats 2] [--write]
       python bench/bench_versions.py --match-rows 1000000,3000000,10000000 --write
       python bench/bench_versions.py --outcome-rows 1000000,3000000 --write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from report import write_section  # noqa: E402

from cloob.prepare.demo_server import DemoServer, demo_rows, render  # noqa: E402


def _table(path: Path, server: DemoServer, size: int, n: int) -> None:
    rows = [{"url": r["url"].replace("http://demo.cloob.invalid", server.url), "caption": r["caption"]}
            for r in demo_rows(0, size, 3, n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def _prepare(spec_file: Path, out: Path, env: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cloob.cli", "prepare", str(spec_file), "--out", str(out),
                        "--no-progress"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"cloob prepare failed:\n{p.stderr[-3000:]}")
    return seconds, json.loads((out / "_cloob" / "manifest.json").read_text())


_MATCH = """
import json, resource, sys, time
import numpy as np
from cloob.prepare import matching
from cloob.prepare import versions as v
from cloob.prepare.spec import load_spec
from cloob.storage import Location
work, table, n1 = sys.argv[1], sys.argv[2], int(sys.argv[3])
store, folder = Location(work), work + "/_cloob"
spec = load_spec({"name": "t", "source": {"kind": "table", "path": table}})
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
matching.key_files(store, folder)
t1, p1 = time.perf_counter(), peak()
tmp, n, counts = v._read_source(spec, folder, False)
t2, p2 = time.perf_counter(), peak()
with matching.Match(store, tmp, n, folder) as m:
    fetched = np.ones(n1, dtype=bool)  # version 1's rows: each in a shard, each a success
    m.run(fetched, fetched, False)
    t3, p3 = time.perf_counter(), peak()
    digest, added, top = m.digest(n1 - 1)
t4 = time.perf_counter()
print(json.dumps({"keys": t1 - t0, "read": t2 - t1, "match": t3 - t2, "digest": t4 - t3, "new": m.n_fresh,
                  "pending": m.n_pending, "sha256": digest, "partition_rows": matching.PARTITION_ROWS,
                  "partitions": 1 << matching._bits(n),
                  "peaks_mb": [p1, p2, p3, peak()]}))
"""


def _match_once(n: int) -> dict:
    """The re-read and match of an (n + n/100)-row table against n known rows, in a fresh process."""
    d = n // 100
    work = Path(tempfile.mkdtemp(prefix="bench-match-"))
    try:
        (work / "_cloob").mkdir()
        schema = pa.schema([("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
                            ("source_key", pa.string())])
        table = work / "table.tsv"
        with pq.ParquetWriter(work / "_cloob" / "rows.parquet", schema) as rows, open(table, "w") as tsv:
            tsv.write("url\tcaption\n")
            for start in range(0, n + d, 100_000):
                ids = range(start, min(start + 100_000, n + d))
                urls = [f"https://img.example.com/{i:09d}/photo.jpg" for i in ids]
                caps = [f"a photo of a thing, one of many, number {i}" for i in ids]
                tsv.writelines(f"{u}\t{c}\n" for u, c in zip(urls, caps))
                k = max(0, min(len(ids), n - start))
                if k:
                    rows.write_table(pa.table({"row_id": list(ids)[:k], "url": urls[:k], "caption": caps[:k],
                                               "source_key": [f"row:{i}" for i in list(ids)[:k]]}, schema=schema))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        p = subprocess.run([sys.executable, "-c", _MATCH, str(work), str(table), str(n)], env=env,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        assert r["new"] == r["pending"] == d, r
        return {**r, "n": n, "d": d, "mb": table.stat().st_size / 1e6}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def match_at_scale(sizes: list[int], write: bool) -> None:
    text = _match_section([_match_once(n) for n in sizes])
    print(text)
    if write:
        old = _section_text(text.splitlines()[0])
        kept = old[old.index(OUTCOMES_HEADING):] if old and OUTCOMES_HEADING in old else ""
        write_section(text.splitlines()[0], text.rstrip("\n") + ("\n\n" + kept if kept else ""))


def _section_text(heading: str) -> str | None:
    """The section of BENCHMARKS.md under `heading` as it is now (up to the next '## '), or None."""
    from report import BENCHMARKS

    lines = BENCHMARKS.read_text().splitlines(keepends=True) if BENCHMARKS.exists() else []
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    return "".join(lines[start:end]).rstrip("\n") + "\n"


MATCH_HEADING = "## Incremental preparation: re-reading the source at scale"
OUTCOMES_HEADING = "### Row outcomes at scale"

_OUTCOMES = """
import json, resource, sys, time
from collections import Counter
from cloob.prepare.manifest import finished_shards, read_outcomes
from cloob.storage import Location
store, which = Location(sys.argv[1]), sys.argv[2]
shards = finished_shards(store)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
# manifest.row_outcomes before read_outcomes, as it was: the tests' reference (one copy)
from tests.test_row_outcomes import reference_row_outcomes as old_row_outcomes

first = dict(list(shards.items())[:1])  # the parquet reader's libraries and pools loaded before the peak
old_row_outcomes(store, first) if which == "old" else read_outcomes(store, first).by_reason()
p0, t0 = peak(), time.perf_counter()
if which == "old":
    ok, fails = old_row_outcomes(store, shards)
    n_ok, n_failed, by = len(ok), len(fails), dict(Counter(fails.values()).most_common())
else:
    out = read_outcomes(store, shards)
    n_ok, n_failed, by = out.n_ok, len(out.failed), out.by_reason()
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "peak_before_mb": p0, "peak_mb": peak(), "ok": n_ok, "failed": n_failed,
                  "by_reason": list(by.items())}))
"""


def _outcome_shards(folder: Path, n: int, per_shard: int = 10_000) -> int:
    """img2dataset-like NNNNN.parquet/_stats.json for n rows (30% failed, with a URL in most messages),
    then every failed row retried, in order, in later shards (a third of them successfully); the rows."""
    import numpy as np

    rng = np.random.default_rng(0)
    kinds = np.array(["HTTP Error 404: Not Found <url>", "<urlopen error timed out> <url>",
                      "HTTP Error 403: Forbidden <url>", "image decoding error", ""], dtype=object)
    schema = pa.schema([("row_id", pa.int64()), ("status", pa.string()), ("error_message", pa.string())])

    def write(sid: int, ids: np.ndarray, fail: np.ndarray) -> None:
        kind = rng.integers(0, len(kinds), len(ids))
        msgs = [None if not f else (kinds[k].replace("<url>", f"http://img.example.com/{i}/photo.jpg")
                                    if kinds[k] else None) for i, f, k in zip(ids.tolist(), fail, kind)]
        pq.write_table(pa.table({"row_id": ids, "status": np.where(fail, "failed_to_download", "success"),
                                 "error_message": msgs}, schema=schema), folder / f"{sid:05d}.parquet")
        (folder / f"{sid:05d}_stats.json").write_text(json.dumps({"count": len(ids),
                                                                  "successes": int((~fail).sum())}))

    failed, sid = [], 0
    for start in range(0, n, per_shard):
        ids = np.arange(start, min(start + per_shard, n), dtype=np.int64)
        fail = rng.random(len(ids)) < 0.3
        write(sid, ids, fail)
        failed.append(ids[fail])
        sid += 1
    retry = np.concatenate(failed)
    for start in range(0, len(retry), per_shard):
        ids = retry[start:start + per_shard]
        write(sid, ids, rng.random(len(ids)) >= 1 / 3)
        sid += 1
    return n + len(retry)


def _outcomes_once(n: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-outcomes-"))
    try:
        rows = _outcome_shards(work, n)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        r = {"n": n, "rows": rows, "shards": len(list(work.glob("*_stats.json")))}
        for which in ("old", "new"):
            p = subprocess.run([sys.executable, "-c", _OUTCOMES, str(work), which], env=env, capture_output=True,
                               text=True)
            if p.returncode != 0:
                raise SystemExit(p.stderr[-3000:])
            r[which] = json.loads(p.stdout.strip().splitlines()[-1])
            print(which, n, {k: v for k, v in r[which].items() if k != "by_reason"}, flush=True)
        old, new = r["old"], r["new"]
        assert (old["ok"], old["failed"], old["by_reason"]) == (new["ok"], new["failed"], new["by_reason"]), r
        return r
    finally:
        shutil.rmtree(work, ignore_errors=True)


def outcomes_at_scale(sizes: list[int], write: bool) -> None:
    runs = [_outcomes_once(n) for n in sizes]
    text = _outcome_section(runs)
    print(text)
    if write:
        old = _section_text(MATCH_HEADING)
        if old is None:
            raise SystemExit(f"BENCHMARKS.md has no section {MATCH_HEADING!r}: run --match-rows with --write first")
        kept = old[:old.index(OUTCOMES_HEADING)] if OUTCOMES_HEADING in old else old
        write_section(MATCH_HEADING, kept.rstrip("\n") + "\n\n" + text)


def _outcome_section(runs: list[dict]) -> str:
    table = "\n".join(
        f"| {x['n']:,} | {x['rows']:,} ({x['shards']}) | {x['new']['ok']:,} / {x['new']['failed']:,} | "
        f"{x['old']['seconds']:.2f} | {x['new']['seconds']:.2f} | "
        f"{x['old']['peak_before_mb']:.0f} / {x['new']['peak_before_mb']:.0f} | "
        f"**{x['old']['peak_mb']:.0f}** | **{x['new']['peak_mb']:.0f}** |" for x in runs)
    per_row = [(x["old"]["peak_mb"] - x["old"]["peak_before_mb"]) * 1e6 / x["n"] for x in runs]
    new_row = [(x["new"]["peak_mb"] - x["new"]["peak_before_mb"]) * 1e6 / x["n"] for x in runs]
    sizes = ",".join(str(x["n"]) for x in runs)
    return f"""{OUTCOMES_HEADING}

{_dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.
Command: `python bench/bench_versions.py --outcome-rows {sizes} --write`.

The row outcomes that build_manifest, a version's totals and a retry round count: which row ids succeeded in
some shard, and each other id's last failure reason. Old: manifest.row_outcomes before, a Python set of the
succeeded ids and a dict {{failed id: reason}}, the shards' parquet files read a row at a time. New:
cloob.prepare.manifest.read_outcomes, the files read column by column into numpy arrays indexed by row id
(a success flag, the last failure's int32 reason code, the first failure's int32 rank: 9 bytes a row id),
reason_of once a distinct message of a shard; then the failed ids in the order of their first failure.
Shards of 10,000 rows in img2dataset's parquet form, 30% of the N rows failed (most messages with their
URL), every failed row retried in later shards and a third of those successful. Each in a fresh process;
the process's peak memory before the call (the interpreter, the imports and the same function over the
first shard, so that the parquet reader is loaded) and after it, in MB; the same counts and
failures_by_reason both ways.

| N | rows read (shards) | succeeded / failed | old s | new s | before MB (old / new) | old peak MB | new peak MB |
|---|---:|---:|---:|---:|---:|---:|---:|
{table}

The peak above the one before, a row of N: old {" and ".join(f"{b:.0f}" for b in per_row)} bytes, new
{" and ".join(f"{b:.0f}" for b in new_row)} (for YFCC15M's 15 million rows, at the larger size's rate: about
{per_row[-1] * 15e6 / 1e9:.1f} GB old, {new_row[-1] * 15e6 / 1e9:.2f} GB new). The new figure is the 9 bytes a row
id, the arrays' growth as the shards come (a quarter at a time), and the Arrow allocator's retained pages
from reading the shards, not a Python object a row.
"""


def _match_section(runs: list[dict]) -> str:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    r = runs[-1]
    n, rows = r["n"], r["n"] + r["d"]
    table = "\n".join(
        f"| {x['n'] + x['d']:,} ({x['mb']:.0f} MB) | {x['partitions']} | {x['keys']:.2f} | {x['read']:.2f} | "
        f"{x['match']:.2f} | {x['digest']:.2f} | {x['peaks_mb'][0]:.0f} / {x['peaks_mb'][1]:.0f} / "
        f"{x['peaks_mb'][2]:.0f} / **{x['peaks_mb'][3]:.0f}** |" for x in runs)
    sizes = ",".join(str(x["n"]) for x in runs)
    return f"""## Incremental preparation: re-reading the source at scale

{_dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores, {ram:.1f} GiB memory, Python
{platform.python_version()}. Command: `python bench/bench_versions.py --match-rows {sizes} --write`.

The fixed part of every incremental preparation, without downloads: a url/caption TSV of N + N/100 rows (N/100
new) read again, streamed, and matched with the N rows of version 1 (each in a shard), in a fresh process per
size. The matching (cloob.prepare.matching) goes through partitions of the identities and buckets of
{r['partition_rows']} positions and of as many row ids, temporary files on local disk, one at a time. Steps:
version 1's identities (keys/000.parquet, once per dataset made before versions existed), the re-read (parse,
clean, digests, temporary parquet), the match (an Arrow hash join a partition; row ids, rows to fetch and new
keys back in source order), the rows' digest (buckets by row id); seconds each, and the process's peak memory
after each (MB, the interpreter and imports included).

| rows | partitions | identities s | re-read s | match s | digest s | peak MB after each step |
|---|---:|---:|---:|---:|---:|---:|
{table}

Per million rows at {rows:,}: {r['keys'] * 1e6 / n:.2f} s identities, {r['read'] * 1e6 / rows:.2f} s re-read,
{(r['match'] + r['digest']) * 1e6 / rows:.2f} s match and digest. The peak memory stays level with the number of
rows: one partition or bucket at a time, plus a byte a row id for each of three flags; the few tens of MB it
moves between sizes are the allocators' and the parquet reader's retained pages, not data kept a row.

Before the matching was partitioned (commit 4a0849a: every row's digests in memory, one hash join, one sort),
its --match-rows 1000000 and 3000000 on this machine the same day: a peak of 451 MB for 1,010,000 rows and 875 MB for 3,030,000,
about 290 bytes a row (4 GB for YFCC15M's 15 million); 459 MB and 1047 MB counting the rest of that match (row
ids, rows to fetch, removed rows, digest). Its times at 3,030,000 rows: 10.9-12.7 s identities, 42-46 s
re-read, 1.1-2.0 s hash join plus 8.2 s for the rest of the match. The rows' digest is the same both ways (the
same sha256 at 1 and 3 million rows).

For CC3M's 3.3 million rows the re-read and match take about
{(r['read'] + r['match'] + r['digest']) * 3.32e6 / rows:.0f} s; the downloads of the new rows come on top, at the
full preparation's rate, plus img2dataset's start-up.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20000, help="rows of version 1")
    ap.add_argument("--delta", type=float, default=0.01, help="new rows, as a fraction of --samples")
    ap.add_argument("--size", type=int, default=64, help="size the server renders at")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--match-rows", help="measure the re-read and match of this many rows instead (a comma list: "
                                         "each size in turn)")
    ap.add_argument("--outcome-rows", help="measure the row outcomes (manifest.read_outcomes against the per-row "
                                           "sets it replaced) over shards of this many rows instead (a comma list)")
    args = ap.parse_args()
    if args.match_rows or args.outcome_rows:
        if args.match_rows:
            match_at_scale([int(x) for x in args.match_rows.split(",")], args.write)
        if args.outcome_rows:
            outcomes_at_scale([int(x) for x in args.outcome_rows.split(",")], args.write)
        return
    n, d = args.samples, max(1, round(args.samples * args.delta))
    work = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO))
    times: dict[str, list[float]] = {"full": [], "incremental": [], "re-read": []}
    try:
        with DemoServer() as server:
            for i in range(n + d):
                render(0, args.size, 3, i)
            table = work / "rows.parquet"
            spec_file = work / "spec.json"
            spec_file.write_text(json.dumps({
                "name": "bench", "source": {"kind": "table", "path": str(table)},
                "download": {"image_size": args.image_size, "shard_size": args.shard_size,
                             "processes": args.processes, "threads": args.threads, "timeout": 30, "retries": 1,
                             "encode_quality": 90}}))
            for r in range(args.repeats):
                order = ["full", "incremental"] if r % 2 == 0 else ["incremental", "full"]
                for who in order:
                    out = work / f"{who}-{r}"
                    if who == "full":
                        _table(table, server, args.size, n + d)
                        seconds, m = _prepare(spec_file, out, env)
                        assert m["totals"]["attempted"] == n + d, m["totals"]
                    else:
                        _table(table, server, args.size, n)
                        _prepare(spec_file, out, env)  # version 1, not timed
                        _table(table, server, args.size, n + d)
                        seconds, m = _prepare(spec_file, out, env)
                        assert m["version"] == 2 and m["rows_added"] == d, m.get("rows_added")
                        os.utime(table)  # touched: read and matched again, nothing to fetch
                        reread, m3 = _prepare(spec_file, out, env)
                        assert m3["content_hash"] == m["content_hash"]
                        times["re-read"].append(reread)
                        print(f"round {r} re-read      {reread:7.2f} s", flush=True)
                    times[who].append(seconds)
                    print(f"round {r} {who:12s} {seconds:7.2f} s", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["incremental"] / med["full"]
    per_run = {k: ", ".join(f"{s:.2f}" for s in v) for k, v in times.items()}
    cmd = "python bench/bench_versions.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("write", "match_rows", "outcome_rows")) + " --write"
    text = f"""## Incremental preparation: a {100 * args.delta:g}% delta against a full preparation

{_dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.
Command: `{cmd}`.

A url/caption table of {n} rows prepared (version 1), then {d} rows appended and the same `cloob prepare` run again
(incremental: version 2, only the new rows fetched), against `cloob prepare` of the whole {n + d}-row table into a new
folder (full). Re-read: the command once more on the unchanged, touched table (the source read and matched
again, nothing fetched). Generated {args.size} px pictures from one local HTTP server; image_size
{args.image_size}, {args.shard_size} per shard, {args.processes} processes x {args.threads} threads. Each time is
the whole command, start-up included (img2dataset's own start-up is about 7-10 s of it here). Goal:
incremental in proportion to the new rows plus the re-read.

| run | wall s (median) | per run |
|---|---:|---|
| full ({n + d} rows fetched) | {med['full']:.2f} | {per_run['full']} |
| incremental ({d} rows fetched) | {med['incremental']:.2f} | {per_run['incremental']} |
| re-read only (0 rows fetched) | {med['re-read']:.2f} | {per_run['re-read']} |

Incremental / full: **{ratio:.3f}** ({100 * d / (n + d):.1f}% of the rows). Incremental minus re-read (the
fetch of the {d} new rows, img2dataset's start-up included): {med['incremental'] - med['re-read']:.2f} s; the
full run per {d} rows: {med['full'] * d / (n + d):.2f} s.
"""
    print(text)
    if args.write:
        write_section(text.splitlines()[0], text)


if __name__ == "__main__":
    main()
