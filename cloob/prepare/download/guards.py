"""The download guards img2dataset lacks, installed in whatever process imports this module.

img2dataset's `timeout` bounds connecting and each socket read, so a server that trickles one byte a
second holds a download thread forever, and nothing bounds a response's size. Importing this module
replaces `img2dataset.downloader.download_image` with one that reads in chunks under a
whole-download deadline and a byte limit, and refuses a JPEG cut short (no end-of-image marker),
which OpenCV would otherwise decode into a half-grey picture without complaint.

Where the patch must run depends on the distributor:
- multiprocessing: img2dataset's spawned pool imports `cloob.prepare.download.fetch` again as `__mp_main__`,
  which imports this module; the limits come from CLOOB_FETCH_DEADLINE and CLOOB_FETCH_MAX_BYTES.
- pyspark and ray: a patch made on the driver never reaches an executor or a Ray worker (the pickled
  Downloader names the pristine img2dataset module). There `GuardedDownloader` takes the place of
  img2dataset's Downloader on the driver: an executor or worker unpickling it imports this module,
  which installs the patch there, and the limits travel on the instance, since the driver's
  environment variables are not set on other machines.

It also keeps a worker of a preparation that was killed from marking its shard finished (see
`abandoned`; cloob.prepare.download.fetch makes its pool workers exit with it).
"""

from __future__ import annotations

import io
import os
import socket
import time
import urllib.request

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import
import img2dataset.downloader as _downloader  # noqa: E402

_UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"

# The limits in force in this process: from the environment (the multiprocessing path), replaced by a
# GuardedDownloader's own when it runs a shard (pyspark, ray).
limits = {"deadline": float(os.environ.get("CLOOB_FETCH_DEADLINE", "60")),
          "max_bytes": int(os.environ.get("CLOOB_FETCH_MAX_BYTES", str(50 * 2**20)))}


def declared_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) as the image's header declares them, read without decoding a pixel; None when
    no PIL format recognises the header (img2dataset's decoder then refuses the body itself).

    The format plugins are asked directly, as Image.open does, but without Image.open's own bomb
    check: it raises above 2 x PIL's MAX_IMAGE_PIXELS and warns above it, a process-wide setting
    that max_image_area, not PIL's default, should decide here."""
    from PIL import Image

    Image.init()
    head = bytes(data[:16])
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(head):
            continue
        try:
            return factory(io.BytesIO(data), "").size
        except Exception:  # noqa: BLE001 -- not this format (or a broken header): try the next
            continue
    return None


def check_body(data: bytes | bytearray, max_image_area: float = float("inf")) -> str | None:
    """An error message for a body that cannot be a whole image, or declares more pixels than
    max_image_area, else None."""
    if data[:2] == _JPEG_SOI and _JPEG_EOI not in data[-4096:]:
        return "truncated JPEG (no end-of-image marker)"
    size = declared_size(data)
    if size is not None and size[0] * size[1] > max_image_area:
        # img2dataset checks the area only after decoding: 875 KB of PNG decode to 900 MB.
        return (f"image area too large: the header declares {size[0]} x {size[1]} = {size[0] * size[1]} "
                f"pixels, above max_image_area {max_image_area:g}; refused before decoding")
    return None


def download_image(row, timeout, user_agent_token, disallowed_header_directives):
    """Drop-in for img2dataset.downloader.download_image: (key, BytesIO or None, error or None)."""
    key, url = row
    deadline_s, max_bytes = limits["deadline"], limits["max_bytes"]
    ua = _UA + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
                if user_agent_token else "")
    deadline = time.monotonic() + deadline_s
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": ua})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if disallowed_header_directives and _downloader.is_disallowed(
                    r.headers, user_agent_token, disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            length = r.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                return key, None, f"response larger than the {max_bytes} byte limit"
            buf = bytearray()
            while True:
                # read1 returns as soon as some bytes arrive, so the deadline is checked often
                # even when a server sends one byte at a time.
                chunk = r.read1(1 << 16)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > max_bytes:
                    return key, None, f"response larger than the {max_bytes} byte limit"
                if time.monotonic() > deadline:
                    return key, None, f"download exceeded the {deadline_s:g}s deadline"
        problem = check_body(buf, limits["max_image_area"])
        if problem:
            return key, None, problem
        return key, io.BytesIO(bytes(buf)), None
    except Exception as err:  # noqa: BLE001 (img2dataset records every failure as a message)
        return key, None, str(err)


_downloader.download_image = download_image

# The area limit is img2dataset's own max_image_area, which its Resizer applies only after decoding:
# each shard's Downloader carries it to whichever process runs the shard (a pool worker, a Spark
# executor, a Ray worker), where it becomes the limit download_image checks against the header.
limits["max_image_area"] = float("inf")
_call = _downloader.Downloader.__call__


def _call_with_area_limit(self, row):
    limits["max_image_area"] = float(getattr(getattr(self, "resizer", None), "max_image_area", float("inf")))
    return _call(self, row)


_downloader.Downloader.__call__ = _call_with_area_limit


# ------------------------------------------------------------------ work for a preparation that ended

# A stats file marks a shard finished. A worker whose preparation was killed (cloob prepare or the
# fetch process gone) must not write one: with the demo's pictures served by the killed process, it
# would mark a shard of failures finished, and the resumed run would keep it. The shard is then left
# without its stats file, which the next run redoes.
_parent = os.getppid()  # in a pool worker, the fetch process (cloob.prepare.download.fetch sets it from its own pid)
_driver: tuple[str, int] | None = None  # (host, pid) of the fetch process that handed out the shard


def set_parent(pid: int) -> None:
    """The process whose end abandons this process's shards (in a pool worker: the fetch process)."""
    global _parent
    _parent = pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The process that ran `cloob prepare` (and serves the demo's pictures), where it runs on this host:
# once it has ended the preparation has, even while the fetch process between it and this worker is
# still dying. Checking the parent alone left a window: a killed preparation's server refused the
# rest of a shard's downloads at once, and the worker marked that shard finished before the fetch
# process was gone (seen in the suite: a resumed demo with 21 images short).
_preparer = ((os.environ.get("CLOOB_PREPARE_HOST", ""), int(os.environ["CLOOB_PREPARE_PID"]))
             if os.environ.get("CLOOB_PREPARE_PID", "").isdigit() else None)


def _ended(pid: int) -> bool:
    """The process is gone, or has exited and waits to be reaped (a zombie: os.kill still finds it)."""
    if not os.path.exists("/proc/self/stat"):
        return not _alive(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        return not _alive(pid)


def abandoned() -> str | None:
    """Why this process's shard belongs to a preparation that ended, else None."""
    if os.getppid() != _parent:
        return "the process that started this worker has ended"
    if _preparer is not None and _preparer[0] == socket.gethostname() and _ended(_preparer[1]):
        return f"the cloob prepare process (pid {_preparer[1]}) has ended"
    if _driver is not None:
        host, pid = _driver
        if host == socket.gethostname() and not _alive(pid):  # a worker on another machine cannot tell
            return f"the preparation that handed out this shard (pid {pid}) has ended"
    return None


_write_stats = _downloader.write_stats


def write_stats(*args, **kwargs):
    """img2dataset's write_stats, refused for a shard of a preparation that ended."""
    why = abandoned()
    if why:
        raise RuntimeError(f"not marking the shard finished: {why}")
    return _write_stats(*args, **kwargs)


_downloader.write_stats = write_stats


class GuardedDownloader(_downloader.Downloader):
    """img2dataset's Downloader with the guards and their limits carried along to remote workers.

    Built by img2dataset itself (`Downloader(**its arguments)`), so the limits come in through
    functools.partial: `partial(GuardedDownloader, deadline=..., max_bytes=...)`."""

    def __init__(self, *args, deadline: float, max_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard_limits = {"deadline": float(deadline), "max_bytes": int(max_bytes)}
        self.driver = (socket.gethostname(), os.getpid())  # built in the fetch process

    def __reduce__(self):
        import pickle

        from cloob.prepare.download.unpickle import guarded_downloader

        # The state travels as bytes, so that unpickling it (which imports img2dataset's writer and
        # with it webdataset) waits until guarded_downloader has run.
        return guarded_downloader, (pickle.dumps(self.__dict__),)

    def __call__(self, row):
        # One shard at a time per worker process (a Spark task, a Ray task): setting the process's
        # limits here is seen by every download thread of this shard.
        global _driver
        limits.update(self.guard_limits)
        _driver = getattr(self, "driver", None)
        _downloader.download_image = download_image  # in case something restored the original
        _downloader.write_stats = write_stats
        return super().__call__(row)
