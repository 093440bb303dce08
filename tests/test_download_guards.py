"""What a download server sends is bounded before it reaches memory or the terminal: a picture whose
header declares more pixels than max_image_area is refused before anything decodes it (fault report
B17: an 875 KB PNG of 30000 x 30000 pixels took one download process to 2.0 GB), and an HTTP
reason phrase is escaped before the preparation summary prints it (B19: it could retitle the window
and clear the screen). Real img2dataset against conftest's image_server on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BOMB_SIDE, ESCAPE_REASON, bomb_png, child_env

from cloob.prepare.demo_server import render

ROOT = Path(__file__).parents[1]
# Runs `cloob prepare` and prints the largest resident set of its process tree, in KiB: the processes
# are all waited for (img2dataset's pool by the fetch process, that by cloob prepare), and Linux
# keeps the largest of them in RUSAGE_CHILDREN.
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")
_PEAK_BOUND_KIB = 1_000_000  # a preparation of a few rows: ~250 MB; the bomb decoded: ~2 GB


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_from_its_header_and_a_servers_reason_phrase_is_escaped(tmp_path,
                                                                                                image_server):
    base = image_server.url
    # Built here, before the download asks for it: the server built it on the first request (about 3 s
    # of CPU, its response held all that time), past the download's 10 s timeout on a loaded machine
    # (a clean-clone run, 2026-12-07: "timed out" instead of the header's refusal).
    bomb_png()
    _, caption = render(3, 48, 3, 0)
    rows = [(f"{base}/3/48/3/0.jpg", caption), (f"{base}/bad/bomb.png", "the bomb"),
            (f"{base}/bad/escape-reason.jpg", "a server's reason phrase")]
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in rows))
    spec = tmp_path / "t.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "source": {"kind": "table", "path": str(tsv)}, "download": {
        "processes": 1, "threads": 2, "timeout": 10, "deadline": 30, "retries": 0, "image_size": 32,
        "shard_size": 16}}))  # max_image_area and max_bytes: the defaults (1e8 pixels, 50 MB)
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "cloob.cli", "prepare", str(spec),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=child_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "/bad/bomb.png" in image_server.httpd.requests

    peak = int(proc.stdout.split("peak-rss-kib")[1].split()[0])
    assert peak < _PEAK_BOUND_KIB, f"the preparation's largest process reached {peak // 1024} MiB"
    reasons = json.loads((out / "_cloob" / "manifest.json").read_text())["totals"]["failures_by_reason"]
    area = BOMB_SIDE * BOMB_SIDE
    assert any("image area too large" in r and f"{BOMB_SIDE} x {BOMB_SIDE}" in r and str(area) in r
               and "before decoding" in r for r in reasons), reasons

    # The reason phrase reaches neither the terminal nor the manifest raw: escaped, as captions are.
    assert "\x1b" not in proc.stdout + proc.stderr and "\x07" not in proc.stdout + proc.stderr
    assert not any("\x1b" in r for r in reasons), reasons
    escaped = ESCAPE_REASON.replace("\x1b", "\\x1b").replace("\x07", "\\x07")
    assert f"HTTP Error 500: {escaped}" in proc.stdout
    assert f"HTTP Error 500: {escaped}" in reasons


def test_the_header_check_and_the_reason_escaping_without_a_download():
    """The same two guards as functions (the quick loop): the bomb's header is read in well under a
    second without decoding it, and reason_of escapes what a server put in its reason phrase."""

    from cloob.prepare.download.guards import check_body, declared_size
    from cloob.prepare.manifest import reason_of

    bomb = bomb_png()
    assert len(bomb) < 1_000_000 and declared_size(bomb) == (BOMB_SIDE, BOMB_SIDE)
    assert "refused before decoding" in check_body(bomb, 1e8)
    assert check_body(bomb) is None  # no limit given: img2dataset's own checks decide
    assert declared_size(b"<html>not a picture</html>") is None
    reason = reason_of(f"HTTP Error 500: {ESCAPE_REASON} for http://host/a.png")
    assert reason == "HTTP Error 500: Oops \\x1b]0;PWNED-TITLE\\x07\\x1b[2J\\x1b[31mRED\\x1b[0m for <url>"
