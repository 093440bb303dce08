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

With --match-rows N it measures the fixed part at scale instead, without downloads: a table of N rows
as version 1's rows file and N + N/100 rows as the grown table, then, in a fresh process, the first
version's identities (made once, on the first re-read of a dataset made before versions existed), the
streamed re-read of the table and the match, with the process's peak memory. It writes the section
"Incremental preparation: re-reading the source at scale".

Usage: python bench/bench_versions.py [--samples 20000] [--delta 0.01] [--shard-size 500]
                                      [--processes 2] [--threads 32] [--repeats 2] [--write]
       python bench/bench_versions.py --match-rows 3000000 --write
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
import pyarrow.compute as pc
from cloob.prepare import identity
from cloob.prepare import versions as v
from cloob.prepare.spec import load_spec
from cloob.storage import Location
work, table = sys.argv[1], sys.argv[2]
spec = load_spec({"name": "t", "source": {"kind": "table", "path": table}})
t0 = time.perf_counter()
known = identity.known_keys(Location(work))
t1 = time.perf_counter()
tmp, keys, content, counts = v._read_source(spec, work + "/_cloob", False)
t2 = time.perf_counter()
new = pc.index_in(identity.key_array(keys), value_set=known["key"]).null_count
t3 = time.perf_counter()
print(json.dumps({"keys": t1 - t0, "read": t2 - t1, "match": t3 - t2, "new": new,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def match_at_scale(n: int, write: bool) -> None:
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
        p = subprocess.run([sys.executable, "-c", _MATCH, str(work), str(table)], env=env, capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        assert r["new"] == d, r
        mb = table.stat().st_size / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = f"""## Incremental preparation: re-reading the source at scale

{_dt.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.
Command: `python bench/bench_versions.py --match-rows {n} --write`.

The fixed part of every incremental preparation, without downloads: a {n + d}-row url/caption TSV ({mb:.0f} MB,
{d} rows new) read again, streamed, and matched with the {n} rows of version 1, in a fresh process.

| step | seconds | per million rows |
|---|---:|---:|
| version 1's identities (once per dataset made before versions existed) | {r['keys']:.2f} | {r['keys'] * 1e6 / n:.2f} |
| re-read of the table (parse, clean, digests, temporary parquet) | {r['read']:.2f} | {r['read'] * 1e6 / (n + d):.2f} |
| match (Arrow hash join of 16-byte digests) | {r['match']:.2f} | {r['match'] * 1e6 / (n + d):.2f} |

Peak memory of the process: {r['rss_mb']:.0f} MB ({r['rss_mb'] * 1e6 / 1024 / (n + d) * 1024:.0f} bytes a row, the
interpreter and imports included). For CC3M's 3.3 million rows that is about
{(r['read'] + r['match']) * 3.32:.0f} s a re-read; the downloads of the new rows come on top, at the full
preparation's rate, plus img2dataset's start-up.
"""
    print(text)
    if write:
        write_section(text.splitlines()[0], text)


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
    ap.add_argument("--match-rows", type=int, help="measure the re-read and match of this many rows instead")
    args = ap.parse_args()
    if args.match_rows:
        match_at_scale(args.match_rows, args.write)
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
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("write", "match_rows")) + " --write"
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
