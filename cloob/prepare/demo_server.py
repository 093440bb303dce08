"""The demo set's image server: generated pictures over real HTTP on 127.0.0.1, no internet needed.

Demo rows carry stable URLs on a reserved host (`http://demo.cloob.invalid/<seed>/<size>/<items>/<i>.jpg`,
`.invalid` never resolves). During preparation img2dataset is pointed at this server as its HTTP proxy,
so it downloads every picture through its normal urllib path, and the rows (and so the dataset's hash)
do not depend on which port the server got. Each picture is rendered on request from its URL alone.
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from cloob.data import synthetic

DEMO_HOST = "demo.cloob.invalid"


def demo_url(seed: int, size: int, max_items: int, index: int) -> str:
    return f"http://{DEMO_HOST}/{seed}/{size}/{max_items}/{index}.jpg"


@functools.lru_cache(maxsize=16384)  # ~50 MB at 64 px: a re-run or a second reader is served from memory
def render(seed: int, size: int, max_items: int, index: int) -> tuple[bytes, str]:
    """The JPEG bytes and the caption of demo picture `index` (deterministic)."""
    rng = random.Random(seed * 1_000_003 + index)
    img, caption, _ = synthetic.sample(rng, size, max_items)
    return synthetic._jpeg(img, quality=92), caption


def demo_rows(seed: int, size: int, max_items: int, samples: int) -> Iterator[dict]:
    for i in range(samples):
        # The caption is decided by the first draws; rendering is only needed when served.
        items, background = synthetic.draw(random.Random(seed * 1_000_003 + i), max_items)
        yield {"url": demo_url(seed, size, max_items, i), "caption": synthetic.caption(items, background)}


class DemoHandler(BaseHTTPRequestHandler):
    """Serves demo pictures; accepts both origin-form and proxy (absolute-URI) requests."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: img2dataset makes thousands of requests
        pass

    def route(self, path: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for a path; subclasses add cases (the tests' bad URLs)."""
        parts = path.strip("/").split("/")
        try:
            seed, size, items, last = parts
            index = int(last.removesuffix(".jpg"))
            seed, size, items = int(seed), int(size), int(items)
            if not (16 <= size <= 1024 and 1 <= items <= 3 and index >= 0):
                raise ValueError
        except ValueError:
            return 404, b"not found\n", "text/plain"
        body, _ = render(seed, size, items, index)
        return 200, body, "image/jpeg"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path if "://" in self.path else self.path.split("?")[0]
        status, body, ctype = self.route(path)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a deadline, a killed run): nothing to report


class DemoServer:
    """A ThreadingHTTPServer on 127.0.0.1 (free port) in a daemon thread; use as a context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler] = DemoHandler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> DemoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
