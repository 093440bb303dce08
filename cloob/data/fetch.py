"""img2dataset, run in its own process, with the download guards it lacks.

img2dataset's `timeout` bounds connecting and each socket read, so a server that trickles one byte a
second holds a download thread forever, and nothing bounds a response's size. Here its
`download_image` is replaced by one that reads in chunks under a whole-download deadline and a byte
limit, and refuses a JPEG cut short (no end-of-image marker), which OpenCV would otherwise decode
into a half-grey picture without complaint.

Run as `python -m cloob.data.fetch ARGS.json` (cloob.data.prepare does): img2dataset installs a SIGINT
handler and a process pool, so it must own its process. Its pool starts with "spawn", which imports
this module again as `__mp_main__` in every worker, so the patch below applies there too.
The guards' limits come from CLOOB_FETCH_DEADLINE and CLOOB_FETCH_MAX_BYTES.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import urllib.request

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import
# Nothing in this process or its workers uses torch, but webdataset (imported by img2dataset's writer)
# imports it when it can: ~3 s of CPU and ~300 MB in the logger process and in every pool worker,
# which img2dataset replaces after 5 shards. With torch unimportable, webdataset uses stand-ins. Only
# when this module is the program (or, in a spawned worker, its copy): imported elsewhere, it must
# not take torch away from its importer.
if __name__ in ("__main__", "__mp_main__"):
    sys.modules.setdefault("torch", None)

import img2dataset.downloader as _downloader  # noqa: E402

DEADLINE = float(os.environ.get("CLOOB_FETCH_DEADLINE", "60"))
MAX_BYTES = int(os.environ.get("CLOOB_FETCH_MAX_BYTES", str(50 * 2**20)))
_UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


def check_body(data: bytes | bytearray) -> str | None:
    """An error message for a body that cannot be a whole image, else None."""
    if data[:2] == _JPEG_SOI and _JPEG_EOI not in data[-4096:]:
        return "truncated JPEG (no end-of-image marker)"
    return None


def download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """Drop-in for img2dataset.downloader.download_image: (key, BytesIO or None, error or None)."""
    key, url = row
    ua = _UA + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
                if user_agent_token else "")
    deadline = time.monotonic() + DEADLINE
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": ua})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if disallowed_header_directives and _downloader.is_disallowed(
                    r.headers, user_agent_token, disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            length = r.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_BYTES:
                return key, None, f"response larger than the {MAX_BYTES} byte limit"
            buf = bytearray()
            while True:
                # read1 returns as soon as some bytes arrive, so the deadline is checked often
                # even when a server sends one byte at a time.
                chunk = r.read1(1 << 16)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_BYTES:
                    return key, None, f"response larger than the {MAX_BYTES} byte limit"
                if time.monotonic() > deadline:
                    return key, None, f"download exceeded the {DEADLINE:g}s deadline"
        problem = check_body(buf)
        if problem:
            return key, None, problem
        return key, io.BytesIO(bytes(buf)), None
    except Exception as err:  # noqa: BLE001 (img2dataset records every failure as a message)
        return key, None, str(err)


_downloader.download_image = download_image


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies: a killed `cloob prepare` must not leave
    img2dataset downloading in the background (its pool workers then see their task pipe close and
    exit).

    Only in img2dataset's main process, never in its pool workers: the signal fires when the parent
    *thread* ends, and replacement workers are started by the pool's worker-handler thread, which
    ends during Pool.terminate(). A worker killed then, while idle, dies holding the task queue's
    lock, and terminate() waits on that lock forever (seen here as img2dataset hanging after its
    last shard)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def main(argv: list[str]) -> int:
    import img2dataset

    _die_with_parent()
    with open(argv[1]) as f:
        kwargs = json.load(f)
    img2dataset.download(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
