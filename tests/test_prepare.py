"""Pretraining data preparation: real img2dataset against a local HTTP server, local disk and S3."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import child_env
from PIL import Image

from cloob.cli import main as cli_main
from cloob.data.shards import list_shards
from cloob.errors import CloobError
from cloob.prepare.demo_server import render
from cloob.prepare.run import prepare, read_manifest
from cloob.prepare.spec import load_spec
from cloob.run.proctree import still_running

FAST = {"processes": 1, "threads": 8, "timeout": 5, "deadline": 6, "retries": 0, "image_size": 32,
        "shard_size": 16, "max_image_area": 1.0e6, "max_bytes": 200_000}
BAD = {"404.jpg": "HTTP Error 404", "not-an-image.jpg": "decod", "truncated.jpg": "truncated JPEG",
       "huge-area.jpg": "image area too large", "too-many-bytes.jpg": "byte limit",
       "trickle.jpg": "deadline"}


def table_spec(tsv: Path, **download) -> dict:
    return {"name": "t", "source": {"kind": "table", "path": str(tsv)}, "download": {**FAST, **download}}


def write_table(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in rows))
    return path


def good_rows(base: str, n: int, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        _, caption = render(3, 48, 3, i)
        out.append((f"{base}{prefix}/3/48/3/{i}.jpg", caption))
    return out


def read_shards(folder: Path) -> dict[int, dict]:
    """row_id -> {caption, json, image size} over every finished shard in a local folder."""
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        if not tar_path.with_name(tar_path.stem + "_stats.json").exists():
            continue
        samples: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for s in samples.values():
            meta = json.loads(s["json"])
            out[meta["row_id"]] = {"caption": s["txt"].decode(), "meta": meta,
                                   "size": Image.open(io.BytesIO(s["jpg"])).size}
    return out


@pytest.mark.slow
def test_prepare_local_with_every_kind_of_bad_url(tmp_path, image_server):
    rows = good_rows(image_server.url, 40)
    rows[5:5] = [(f"{image_server.url}/bad/{name}", f"bad case {name}") for name in BAD]
    tsv = write_table(tmp_path / "rows.tsv", rows + [("ftp://nope/x.jpg", "not http"), ("http://x/y.jpg", "  ")])
    out = tmp_path / "ds"
    t0 = time.monotonic()
    m = prepare(load_spec(table_spec(tsv)), str(out), progress=False)
    elapsed = time.monotonic() - t0

    t = m["totals"]
    assert m["rows"]["invalid_url"] == 1 and m["rows"]["empty_caption"] == 1 and t["rows"] == 46
    assert (t["successes"], t["failures"], t["attempted"]) == (40, 6, 46)
    assert t["success_rate"] == pytest.approx(40 / 46, abs=1e-6)
    reasons = " | ".join(t["failures_by_reason"])
    for name, words in BAD.items():
        assert words in reasons, (name, t["failures_by_reason"])
    assert sum(t["failures_by_reason"].values()) == 6
    # The trickling URL is cut at the deadline (6 s) plus at most one socket timeout (5 s), not waited on:
    # the whole preparation, img2dataset start-up included, ends long before pytest's timeout.
    assert elapsed < 120

    # What is in the shards is exactly what was served, under the rows' ids.
    got = read_shards(out)
    served = {i if i < 5 else i + len(BAD): r for i, r in enumerate(good_rows(image_server.url, 40))}
    assert set(got) == set(served)
    for rid, (url, caption) in served.items():
        assert got[rid]["caption"] == caption and got[rid]["meta"]["url"] == url
        assert min(got[rid]["size"]) == 32  # keep_ratio resize of the 48 px original
    # The manifest's shard list, counts and digests match the files.
    assert [e["shard"] for e in m["shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    for e in m["shards"]:
        data = (out / e["shard"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]
        assert e["successes"] == e["samples"]
    assert sum(e["successes"] for e in m["shards"]) == 40
    assert list_shards(str(out)).num_samples == 40
    assert m["spec_hash"] == load_spec(table_spec(tsv)).content_hash()
    assert m["tools"]["img2dataset"] and m["content_hash"]
    on_disk = read_manifest(str(out))
    assert on_disk["content_hash"] == m["content_hash"] and on_disk["totals"] == t

    # A re-run is a no-op: no request reaches the server, the manifest file is unchanged.
    before, n_requests = (out / "_cloob" / "manifest.json").read_bytes(), len(image_server.httpd.requests)
    again = prepare(load_spec(table_spec(tsv)), str(out), progress=False)
    assert again["run"]["noop"] and again["content_hash"] == m["content_hash"]
    assert len(image_server.httpd.requests) == n_requests
    assert (out / "_cloob" / "manifest.json").read_bytes() == before


@pytest.mark.slow
def test_retry_failed_fetches_only_the_failed_rows(tmp_path, image_server):
    base = image_server.url
    rows = good_rows(base, 20) + good_rows(base, 6, prefix="/flaky") + [(f"{base}/bad/404.jpg", "gone")]
    tsv = write_table(tmp_path / "rows.tsv", rows)
    out = tmp_path / "ds"
    spec = load_spec(table_spec(tsv, shard_size=10))
    m1 = prepare(spec, str(out), progress=False)
    assert (m1["totals"]["successes"], m1["totals"]["failures"]) == (20, 7)
    assert m1["totals"]["failures_by_reason"].get("HTTP Error 503: Service Unavailable") == 6

    image_server.httpd.requests.clear()
    m2 = prepare(spec, str(out), retry_failed=True, progress=False)
    asked = sorted(image_server.httpd.requests)
    assert asked == sorted(["/bad/404.jpg"] + [f"/flaky/3/48/3/{i}.jpg" for i in range(6)])
    assert (m2["totals"]["successes"], m2["totals"]["failures"]) == (26, 1)
    assert m2["totals"]["failures_by_reason"] == {"HTTP Error 404: Not Found": 1}
    assert [e["shard"] for e in m2["shards"]][-1] == "00003.tar"  # the retry went into a new shard
    assert m2["history"][-1]["mode"] == "retry-failed" and m2["history"][-1]["rows"] == 7
    got = read_shards(out)
    assert sorted(got) == list(range(26)) and list_shards(str(out)).num_samples == 26
    assert got[22]["caption"] == rows[22][1]
    retry_rows = pq.read_table(out / "_cloob" / "retry" / "000.parquet").column("row_id").to_pylist()
    assert sorted(retry_rows) == list(range(20, 27))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cloob.cli", "prepare", *args]


@pytest.mark.slow
def test_killed_preparation_resumes_to_the_same_manifest(tmp_path):
    args = ["demo", "--set", "source.samples=480", "--set", "download.shard_size=48", "--set",
            "download.processes=1", "--set", "download.threads=2", "--set", "download.image_size=32",
            "--no-progress"]
    env = child_env()
    import psutil

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(killed.glob("*_stats.json"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "preparation ended before it could be killed"
            time.sleep(0.05)
        # Only `cloob prepare` itself, as the OOM killer would: img2dataset and its pool workers must
        # stop on their own. A worker that went on would finish its shard with the demo's server gone
        # (every image failed) and mark it done, and the resumed run would keep that shard.
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "img2dataset's processes were not found"
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_at_kill = len(list(killed.glob("*_stats.json")))
    assert 2 <= done_at_kill < 10 and not (killed / "_cloob" / "manifest.json").exists()
    finished_before = {p.name: p.read_bytes() for p in killed.glob("*.tar")
                       if p.with_name(p.stem + "_stats.json").exists()}

    resumed = subprocess.run(_cli(*args, "--out", str(killed)), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(_cli(*args, "--out", str(tmp_path / "straight")), env=env, capture_output=True,
                              text=True)
    assert straight.returncode == 0, straight.stderr
    a, b = read_manifest(str(killed)), read_manifest(str(tmp_path / "straight"))
    assert a["content_hash"] == b["content_hash"]
    assert a["totals"] == b["totals"] and a["totals"]["successes"] == 480
    strip = lambda m: [{k: v for k, v in e.items() if k not in ("sha256", "bytes")} for e in m["shards"]]  # noqa: E731
    assert strip(a) == strip(b)
    # Shards finished before the kill were kept as they were, not downloaded again.
    for name, data in finished_before.items():
        assert (killed / name).read_bytes() == data
    assert "480 rows -> 480 images in 10 shards" in resumed.stdout


@pytest.mark.slow
def test_prepare_demo_into_s3_keeps_secrets_out(tmp_path, s3, monkeypatch, capfd):
    secret = "Sentinel-Secret-3b1f9e"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any credentials
    s3.mkdir("prep-bucket")
    out = "s3://prep-bucket/datasets/demo"
    rc = cli_main(["prepare", "demo", "--out", out, "--set", "source.samples=100", "--set",
                   "download.shard_size=40", "--set", "download.processes=1", "--set", "download.image_size=32"])
    assert rc == 0
    m = read_manifest(out)
    assert m["totals"]["successes"] == 100 and [e["shard"] for e in m["shards"]] == \
        ["00000.tar", "00001.tar", "00002.tar"]
    for e in m["shards"]:
        assert hashlib.sha256(s3.cat(f"prep-bucket/datasets/demo/{e['shard']}")).hexdigest() == e["sha256"]
    assert list_shards(out).num_samples == 100
    # The captions came through the real download: compare one sample with what the server renders.
    with s3.open("prep-bucket/datasets/demo/00000.tar", "rb") as f, tarfile.open(fileobj=f) as tar:
        txt = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith((".txt", ".json"))}
    key = min(name.removesuffix(".json") for name in txt if name.endswith(".json"))
    rid = json.loads(txt[f"{key}.json"])["row_id"]
    assert txt[f"{key}.txt"].decode() == render(0, 64, 3, rid)[1]
    # No credential in anything written or printed.
    for path in s3.find("prep-bucket"):
        assert secret.encode() not in s3.cat(path), path
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    assert "100 rows -> 100 images in 3 shards" in captured.out


def test_bad_specs_and_sources_give_one_clear_error(tmp_path, capsys):
    def err(*argv) -> str:
        assert cli_main(["prepare", *argv]) == 2
        return capsys.readouterr().err

    out = str(tmp_path / "o")
    e = err("cc3m", "--out", out)
    assert "needs Google's TSV" in e and "fix: download the CC3M TSV" in e and "--input" in e
    e = err("yfcc15m", "--out", out)
    assert "YFCC100M metadata" in e and "--input" in e
    e = err("no-such-spec", "--out", out)
    assert "not found" in e and "demo" in e
    e = err("demo", "--out", out, "--set", "download.resize_mode=squash")
    assert "download.resize_mode" in e and "fix:" in e
    e = err("demo", "--out", out, "--set", "download.colour=red")
    assert "download.colour" in e
    swapped = tmp_path / "swapped.tsv"
    swapped.write_text("http://a/b.jpg\ta caption\n")
    e = err("cc3m", "--out", out, "--input", str(swapped))
    assert "caption<TAB>url" in e
    e = err("cc3m", "--out", out, "--input", str(tmp_path / "missing.tsv"))
    assert "does not exist" in e
    table = write_table(tmp_path / "t.tsv", [("http://a/b.jpg", "x")])
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\nsource: {{kind: table, path: {table}, url_col: link}}\n")
    e = err(str(spec), "--out", out)
    assert "no column(s) ['link']" in e and "url_col" in e
    spec.write_text(f"name: t\nsource: {{kind: table, path: {write_table(tmp_path / 'u.tsv', [('nope', 'x')])}}}\n")
    e = err(str(spec), "--out", out)
    assert "no usable rows" in e and "invalid URL 1" in e
    e = err("demo", "--out", out, "--input", "x.tsv")
    assert "takes no --input" in e
    assert not Path(out).exists()  # no failed attempt left anything behind


@pytest.mark.slow
def test_a_folder_holding_another_dataset_is_refused(tmp_path, image_server):
    tsv = write_table(tmp_path / "rows.tsv", good_rows(image_server.url, 3))
    out = str(tmp_path / "ds")
    prepare(load_spec(table_spec(tsv)), out, progress=False)
    other = load_spec(table_spec(tsv, image_size=40))
    with pytest.raises(CloobError, match="different spec") as e:
        prepare(other, out, progress=False)
    assert "--force" in str(e.value)
    assert "download.image_size 32 -> 40" in str(e.value) and e.value.differences == ["download.image_size 32 -> 40"]
    m = prepare(other, out, force=True, progress=False)
    assert m["totals"]["successes"] == 3 and m["spec_hash"] == other.content_hash()
    assert min(read_shards(Path(out))[0]["size"]) == 40


def test_cc3m_rows_are_read_with_line_ids(tmp_path):
    from collections import Counter

    from cloob.prepare.sources import iter_rows

    tsv = tmp_path / "cc.tsv"
    tsv.write_text("a dog  on\tgrass\thttp://x/1.jpg\n".replace("\tgrass", " grass")
                   + "\thttp://x/2.jpg\nsecond\tnot-a-url\nthird one\thttps://x/4.jpg\n")
    counts: Counter = Counter()
    rows = list(iter_rows(load_spec({"name": "c", "source": {"kind": "cc3m", "path": str(tsv)}}), counts))
    assert [(r["row_id"], r["caption"], r["url"]) for r in rows] == \
        [(0, "a dog on grass", "http://x/1.jpg"), (3, "third one", "https://x/4.jpg")]
    assert counts == Counter(read=4, kept=2, empty_caption=1, invalid_url=1)


def test_fast_shard_digest_equals_the_tarfile_one(tmp_path, shards_dir):
    from cloob.prepare.manifest import _digest_tarfile, _digest_ustar, _NotPlainUstar, shard_digest
    from cloob.storage import Location

    long_name = tmp_path / "long.tar"
    with tarfile.open(long_name, "w") as tar:  # a 150-character name needs a pax header or GNU entry
        data = b"x" * 700
        info = tarfile.TarInfo("k" * 150 + ".txt")
        info.size, info.mtime = len(data), 1.5
        tar.addfile(info, io.BytesIO(data))
    for path in [*sorted(shards_dir.glob("*.tar")), long_name]:
        where = Location(str(path.parent))
        fast, slow = shard_digest(where, path.name), _digest_tarfile(where, path.name)
        assert fast == slow and fast["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert shard_digest(Location(str(tmp_path)), "long.tar")["samples"] == 1
    assert _digest_ustar(Location(str(shards_dir)), "00000.tar")["samples"] == 12
    cut = tmp_path / "cut.tar"
    cut.write_bytes((shards_dir / "00000.tar").read_bytes()[:1500])
    with pytest.raises(_NotPlainUstar):
        _digest_ustar(Location(str(tmp_path)), "cut.tar")


def _finished_folder(folder: Path, shards_dir: Path) -> None:
    """Four finished shards as img2dataset leaves them (tar, parquet of row outcomes, stats), where
    rows 3 and 5 failed in shard 0, and row 3 succeeded when retried into shard 3; plus a write in
    progress (a hidden temp file) that no listing may count."""
    folder.mkdir()
    for i in range(4):
        for ext in (".tar", "_stats.json"):
            (folder / f"{i:05d}{ext}").write_bytes((shards_dir / f"{i:05d}{ext}").read_bytes())
        ids = [3, 5] if i == 3 else list(range(i * 12, i * 12 + 12))
        status = ["success" if i > 0 or rid not in (3, 5) else "failed_to_download" for rid in ids]
        errors = [None if st == "success" else f"HTTP Error 404 for http://x/{rid}.jpg" for rid, st in
                  zip(ids, status)]
        if i == 3:
            status, errors = ["success", "failed_to_download"], [None, "timed out http://x/5.jpg"]
        pq.write_table(pa.table({"row_id": ids, "status": status, "error_message": errors}),
                       folder / f"{i:05d}.parquet")
    (folder / ".tmp-x-00009_stats.json").write_text("{}")


def test_the_manifest_reads_a_location_the_same_locally_and_on_s3(tmp_path, shards_dir, s3):
    """manifest.py works on a cloob.storage.Location: one dataset folder, copied to S3, gives the same
    shards, digests, row outcomes and manifest (and content hash) in both places."""
    from cloob.prepare.manifest import build_manifest, finished_shards, row_outcomes, shard_digest
    from cloob.storage import Location

    _finished_folder(tmp_path / "ds", shards_dir)
    s3.mkdir("manifests")
    local, remote = Location(str(tmp_path / "ds")), Location("s3://manifests/ds")
    remote.copy_in(str(tmp_path / "ds"))
    spec = load_spec({"name": "t", "source": {"kind": "table", "path": "rows.tsv"}})
    rows = {"spec_hash": spec.content_hash(), "sha256": "0" * 64, "kept": 46}
    manifests = []
    for store in (local, remote):
        shards = finished_shards(store)
        assert shards == {0: "00000", 1: "00001", 2: "00002", 3: "00003"}
        d = shard_digest(store, "00002.tar")
        assert d["sha256"] == hashlib.sha256((shards_dir / "00002.tar").read_bytes()).hexdigest()
        assert d["samples"] == 12 and d["bytes"] == (shards_dir / "00002.tar").stat().st_size
        ok, fails = row_outcomes(store, shards)
        assert ok == set(range(36)) - {5} and fails == {5: "timed out <url>"}
        m = build_manifest(store, "_cloob", spec=spec, spec_hash=spec.content_hash(), rows=rows, history=[])
        assert store.list("_cloob/digests") == [f"{i:05d}.json" for i in range(4)]
        assert store.read_json("_cloob/digests/00002.json") == d
        manifests.append(m)
    a, b = manifests
    assert a == b and a["totals"]["shards"] == 4 and a["totals"]["failures"] == 1
    # a second build reads the digests back instead of the tars
    (tmp_path / "ds" / "00001.tar").write_bytes(b"x" * a["shards"][1]["bytes"])
    again = build_manifest(local, "_cloob", spec=spec, spec_hash=spec.content_hash(), rows=rows, history=[])
    assert again["content_hash"] == a["content_hash"]


# ------------------------------------------------- a folder of the user's, a junk table, two at once

SMALL_DEMO = ["--set", "source.samples=32", "--set", "download.shard_size=16", "--set", "download.processes=1",
              "--set", "download.image_size=32", "--no-progress"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def _users_folder(folder: Path, shards_dir: Path, config_json: bool) -> dict[str, bytes]:
    """Fault report 8i: a folder of someone else's files, three of them with shard names."""
    folder.mkdir()
    (folder / "thesis.txt").write_text("notes\n")
    (folder / "00000.tar").write_bytes((shards_dir / "00000.tar").read_bytes())
    (folder / "00001.tar").write_text("mine\n")
    (folder / "00001.parquet").write_text("notes\n")
    if config_json:  # img2dataset crashed on this one and left _cloob/ and _tmp/ behind
        (folder / "config.json").write_text('{"lr": 0.1}\n')
    return _snapshot(folder)


@pytest.mark.parametrize("config_json", [False, True], ids=["shards-named", "with-config-json"])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_folder_of_other_files_is_refused_and_left_untouched(tmp_path, shards_dir, capsys, config_json, force):
    user = tmp_path / "other"
    before = _users_folder(user, shards_dir, config_json)
    rc = cli_main(["prepare", "demo", "--out", str(user), *SMALL_DEMO, *(["--force"] if force else [])])
    err = capsys.readouterr().err
    assert rc == 2, err
    n = 5 if config_json else 4
    assert f"{user} is not empty and was not made by cloob prepare" in err and f"({n} entries)" in err
    assert "thesis.txt" in err and "00001.tar" in err and "fix: give a new or empty folder" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert _snapshot(user) == before  # every byte of the user's as it was, and nothing added


def test_a_prefix_of_other_objects_on_s3_is_refused_and_left_untouched(s3, capsys):
    s3.mkdir("users-bucket")
    theirs = {"users-bucket/theirs/00000.tar": b"mine", "users-bucket/theirs/thesis.txt": b"notes\n"}
    for key, data in theirs.items():
        s3.pipe(key, data)
    rc = cli_main(["prepare", "demo", "--out", "s3://users-bucket/theirs", *SMALL_DEMO])
    err = capsys.readouterr().err
    assert rc == 2 and "not made by cloob prepare" in err and "(2 entries)" in err, err
    s3.invalidate_cache()
    assert sorted(s3.find("users-bucket")) == sorted(theirs)
    assert all(s3.cat(key) == data for key, data in theirs.items())


@pytest.mark.slow
def test_a_stray_json_in_a_prepared_folder_is_refused_before_anything_is_written(tmp_path, image_server, capsys):
    tsv = write_table(tmp_path / "rows.tsv", good_rows(image_server.url, 3))
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(table_spec(tsv)))
    out = tmp_path / "ds"
    assert cli_main(["prepare", str(spec), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    (out / "config.json").write_text("{}\n")
    before = _snapshot(out)
    for force in ([], ["--force"]):
        assert cli_main(["prepare", str(spec), "--out", str(out), "--no-progress", *force]) == 2
        err = capsys.readouterr().err
        assert "top-level JSON files that are not shard stats: config.json (1 entries)" in err, err
        assert "fix: move them out" in err
        assert _snapshot(out) == before
    (out / "config.json").unlink()
    assert cli_main(["prepare", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["table", "cc3m"])
def test_a_junk_table_gives_a_message_without_control_bytes(tmp_path, capsys, kind):
    """Fault report 8f: 300 KB of binary junk as the source table. The message quoted it raw, BEL, SI
    and all, to the terminal."""
    import random

    junk = tmp_path / "junk.tsv"
    rng = random.Random(8)
    junk.write_bytes(bytes(rng.getrandbits(8) for _ in range(300_000)))
    if kind == "table":
        spec = tmp_path / "spec.yaml"
        spec.write_text(json.dumps({"name": "junk", "source": {"kind": "table", "path": str(junk)}}))
        argv = ["prepare", str(spec)]
    else:
        argv = ["prepare", "cc3m", "--input", str(junk)]
    rc = cli_main([*argv, "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "fix:" in err, err
    assert all(ch.isprintable() or ch == "\n" for ch in err), [ch for ch in err if not ch.isprintable()][:10]
    assert len(err) < 2000
    assert not (tmp_path / "o").exists()


def test_safe_text_escapes_and_cuts():
    from cloob.safetext import safe_text

    assert safe_text("ok: a b") == "ok: a b"
    assert safe_text("bell\x07 si\x0f esc\x1b[2J nl\n\u202e") == "bell\\x07 si\\x0f esc\\x1b[2J nl\\n\\u202e"
    assert safe_text(b"\xff\xfe ab") == "\\xff\\xfe ab"
    cut = safe_text("x" * 1000, limit=10)
    assert cut == "x" * 10 + "... (990 more characters)"


@pytest.mark.slow
def test_two_preparations_of_one_folder_one_is_refused(tmp_path):
    """Fault report 5c: two preparations raced img2dataset in one folder (one failed on the other's
    _tmp). The second is now refused while the first holds the folder's lock, naming it."""
    args = ["demo", "--set", "source.samples=480", "--set", "download.shard_size=48", "--set",
            "download.processes=1", "--set", "download.threads=1", "--set", "download.image_size=32",
            "--no-progress", "--out", str(tmp_path / "ds")]
    env = child_env()
    first = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock, owner = tmp_path / "ds" / "_cloob" / "lock.json", tmp_path / "ds" / "_cloob" / "spec.json"
        deadline = time.monotonic() + 120
        while not owner.exists():  # the first has read its rows and is downloading
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        holder = json.loads(lock.read_text())["pid"] if lock.exists() else None  # (None: no lock at all)
        second = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=300)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stdout + second.stderr
    assert holder == first.pid and f"pid {holder}" in second.stderr
    assert "is in use: cloob prepare demo" in second.stderr
    assert "fix:" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, err
    assert "480 rows -> 480 images in 10 shards" in out
    assert not lock.exists()


def test_img2dataset_processes_do_not_load_torch():
    """The fetch program's module, as the program and as the copy a spawned img2dataset worker runs,
    leaves torch unimportable: webdataset then uses stand-ins, and img2dataset needs none of torch."""
    probe = ("import runpy, sys; runpy.run_module('cloob.prepare.download.fetch', run_name='__mp_main__'); "
             "import img2dataset.writer, webdataset; print(sys.modules.get('torch'))")
    env = child_env()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr[-2000:]


def test_a_worker_whose_cloob_prepare_has_ended_marks_no_shard_finished(monkeypatch):
    """The window the parent check left: cloob prepare is dead (here: exited, not yet reaped, as
    right after a kill) while the fetch process between it and the worker still lives. The worker
    must not write the shard's stats file then."""
    import socket

    from cloob.prepare.download import guards

    monkeypatch.setattr(guards, "_parent", os.getppid())
    monkeypatch.setattr(guards, "_preparer", (socket.gethostname(), os.getpid()))
    assert guards.abandoned() is None  # alive: the shard may be marked finished
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while not guards._ended(child.pid):  # exited, a zombie until waited for
        assert time.monotonic() < deadline
        time.sleep(0.05)
    monkeypatch.setattr(guards, "_preparer", (socket.gethostname(), child.pid))
    assert f"the cloob prepare process (pid {child.pid}) has ended" == guards.abandoned()
    with pytest.raises(RuntimeError, match="not marking the shard finished"):
        guards.write_stats()
    monkeypatch.setattr(guards, "_preparer", ("another-host", child.pid))  # a worker elsewhere cannot tell
    assert guards.abandoned() is None
    child.wait()


@pytest.mark.slow
def test_prepare_from_a_folder_holding_a_ray_folder(tmp_path, monkeypatch):
    """A `ray/` folder in the current directory (here a package, which shadows the installed ray as an
    empty folder shadows a ray that is not installed) is not img2dataset's ray: the fetch process
    does not import from the working directory. It failed with "module 'ray' has no attribute
    'remote'" (img2dataset imports ray at start-up)."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    spec = load_spec("demo", ["source.samples=12", "download.shard_size=12", "download.processes=1",
                              "download.image_size=32"])
    m = prepare(spec, "data/demo", progress=False)  # relative to the working directory, as in the README
    assert m["totals"]["successes"] == 12
    assert list_shards(str(tmp_path / "data" / "demo")).num_samples == 12


def test_rows_are_sorted_by_row_id_in_bounded_runs(tmp_path):
    """cloob.prepare.rowsort: rows out of order (as YFCC's SQLite table and parts give them) come out in
    row-id order, equal ids in their first order, over many sorted runs merged; the digest is the
    sorted rows' digest, which rows already in order get without sorting."""
    import hashlib
    import random

    from cloob.prepare.rowsort import row_line, sort_rows
    from cloob.prepare.run import ROW_SCHEMA

    rows = [{"row_id": i % 40, "url": f"http://x/{i}.jpg", "caption": f"c{i}", "source_key": f"k{i}"}
            for i in range(53)]
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    src, dst = tmp_path / "src.parquet", tmp_path / "dst.parquet"
    pq.write_table(pa.Table.from_pylist(shuffled, schema=ROW_SCHEMA), src)
    digest = sort_rows(str(src), str(dst), ROW_SCHEMA, run_rows=7)  # 8 runs
    got = pq.read_table(dst).to_pylist()
    want = sorted(shuffled, key=lambda r: r["row_id"])  # stable, as sort_rows
    assert got == want
    assert digest == hashlib.sha256(b"".join(row_line(r["row_id"], r["url"], r["caption"]) for r in want)).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.parquet", "src.parquet"]  # runs removed


def test_a_stats_file_caught_mid_write_is_read_again(tmp_path, image_server, monkeypatch):
    """img2dataset writes a shard's NNNNN_stats.json in place, last: the progress poll can find it
    empty (seen once in CI as a JSONDecodeError that failed the preparation). It is read again."""
    from cloob.storage import Location

    real, caught = Location.read_json, []

    def half_written(self, rel, *a, **k):
        if rel.endswith("_stats.json") and rel not in caught:
            caught.append(rel)
            raise json.JSONDecodeError("Expecting value", "", 0)  # what json.load says of an empty file
        return real(self, rel, *a, **k)

    monkeypatch.setattr(Location, "read_json", half_written)
    tsv = write_table(tmp_path / "rows.tsv", good_rows(image_server.url, 20))
    m = prepare(load_spec(table_spec(tsv, shard_size=10)), str(tmp_path / "ds"), progress=False)
    assert caught and (m["totals"]["successes"], m["totals"]["shards"]) == (20, 2)


@pytest.mark.slow
def test_a_resumed_preparation_reports_what_this_run_fetched(tmp_path, image_server, capsys):
    # 60 rows in shards of 16: 16, 16, 16 and 12 rows. With shards 1 and 3 gone, a rerun fetches
    # 28 rows in 2 of 4 shards, and its summary says so, not the whole set's 60 (the 2026-12-07 report).
    import yaml

    tsv = write_table(tmp_path / "rows.tsv", good_rows(image_server.url, 60))
    spec_file = tmp_path / "t.yaml"
    spec_file.write_text(yaml.safe_dump(table_spec(tsv)))
    out = tmp_path / "ds"
    assert cli_main(["prepare", str(spec_file), "--out", str(out), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "this run:" in first and "download 60 rows in" in first and "already there" not in first
    for stem in ("00001", "00003"):
        for suffix in (".tar", ".parquet", "_stats.json"):
            (out / f"{stem}{suffix}").unlink()
    assert cli_main(["prepare", str(spec_file), "--out", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "download 28 rows (2 of 4 shards; 2 were already there) in" in again, again
    assert "60 rows -> 60 images in 4 shards" in again
    last = read_manifest(str(out))["history"][-1]
    assert (last["rows"], last["new_shards"], last["shards"], last["shards_kept"]) == (28, 2, 2, 2)


def signal_mid_download(out: Path, *more: str, sig: int = signal.SIGTERM,
                        settle_s: float = 10.0) -> tuple[subprocess.CompletedProcess, list, list]:
    """`cloob prepare demo` (480 rows, 10 shards) in a new session, `sig` to it alone once a shard
    is finished; returns its result, what of its process tree (as it was at the signal, and any
    process of its session) is still alive `settle_s` after it ended, and the names in that tree."""
    import psutil

    args = ["demo", "--out", str(out), "--set", "source.samples=480", "--set", "download.shard_size=48",
            "--set", "download.threads=2", "--set", "download.image_size=32", "--no-progress", *more]
    proc = subprocess.Popen(_cli(*args), env=child_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("*_stats.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = [p.name() for p in tree]
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        end = time.monotonic() + settle_s
        while True:  # whatever still runs, once all is gone or settle_s is up
            _, alive = psutil.wait_procs(tree, timeout=0)
            in_session = []
            for p in psutil.process_iter():
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getsid(p.pid) == proc.pid:
                        in_session.append(p)
            # A zombie counts as gone: a killed process whose parent is gone waits for init to reap it
            # (about a second here, 2026-12-07) and runs nothing meanwhile.
            left = [f"{p.pid} {p.name()}" for p in still_running({*alive, *in_session})]
            if not left or time.monotonic() >= end:
                break
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), left, names


def assert_stopped_in_one_line(done: subprocess.CompletedProcess, left: list, out: Path) -> None:
    assert done.returncode == 143, (done.returncode, done.stderr)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines == [f"cloob prepare: stopped by SIGTERM; the finished shards in {out} are kept, rerun the "
                     "same command to resume"], done.stderr
    assert not left, left
    assert not (out / "_cloob" / "lock.json").exists()


@pytest.mark.slow
def test_sigterm_stops_a_preparation_in_one_line_and_leaves_nothing_running(tmp_path):
    out = tmp_path / "d"
    done, left, _ = signal_mid_download(out, "--set", "download.processes=1")
    assert_stopped_in_one_line(done, left, out)
    kept = len(list(out.glob("*_stats.json")))
    assert 1 <= kept < 10 and not (out / "_cloob" / "manifest.json").exists()
    again = subprocess.run(_cli("demo", "--out", str(out), "--set", "source.samples=480", "--set",
                                "download.shard_size=48", "--set", "download.threads=2", "--set",
                                "download.image_size=32", "--set", "download.processes=1", "--no-progress"),
                           env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "480 rows -> 480 images in 10 shards" in again.stdout
    assert f"({10 - kept} of 10 shards; {kept} were already there)" in again.stdout, again.stdout


def test_the_pool_is_no_larger_than_the_shards_a_round_fetches():
    """img2dataset starts every process of its pool whatever the work: a round with fewer shards to
    fetch than download.processes starts one per shard; Spark and Ray keep the cores they were given."""
    from cloob.prepare.download.rounds import pool_size

    spec = load_spec("demo", ["download.processes=4"])
    assert [pool_size(spec, n) for n in (0, 1, 3, 4, 10, None)] == [1, 1, 3, 4, 4, 4]
    for engine in ("ray", "pyspark"):
        assert pool_size(load_spec("demo", ["download.processes=4", f"download.distributor={engine}"]), 1) == 4
