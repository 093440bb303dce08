"""Shared set-up: the environment of the processes tests start (`child_env`), Prefect's settings for
the session (`pytest_configure`), generated shards (`make_shards`, `shards_dir`), a local
S3-protocol server (moto), local HTTP and image servers, a real Prefect server and GPU-pool process
workers (`prefect_server`, `gpu_workers`, from tests/prefect_stack.py), and the check that slow
tests are marked slow."""

from __future__ import annotations

import functools
import io
import os
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

# Test processes side by side (pytest -n N): each, and every process it starts (torchrun's ranks, the
# demo, Prefect workers), gets its share of the cores as torch's compute threads. Set before anything
# imports torch, which reads it once. With 2 threads in each of 2 processes on 2 cores, OpenMP's
# spin-waiting threads took turns on the cores, and the suite ran slower than with one each.
if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

from cloob.data import synthetic  # noqa: E402
from cloob.prepare.demo_server import DemoHandler, DemoServer, render  # noqa: E402

ROOT = Path(__file__).parents[1]


def child_env(base: dict | None = None, *, path: str | Path = ROOT, **extra) -> dict:
    """The environment of a process a test starts (`python -m cloob...`, torchrun, a Prefect server or
    worker): `base` (this process's environment when None; `{}` for just the variables to add, as
    cloob.run.launch's env= takes them) with PYTHONPATH set to `path` (the checkout, so that cloob,
    flows and tests import from it), and `extra` on top."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(path)
    env.update(extra)
    return env


def rank_number(p) -> int | None:
    """The global rank of a training process (a psutil.Process): from its name when it was forked from
    torchrun's agent (cloob-rank<N>, cloob.run.rank_fork), else from its environment (a new
    interpreter: CLOOB_RANK_START=exec, or bare torchrun). None for any other process."""
    name = p.name()
    if name.startswith("cloob-rank"):
        return int(name.removeprefix("cloob-rank"))
    rank = p.environ().get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


def pytest_configure(config):
    """Prefect's settings for this test process, before anything imports Prefect (it reads them once):
    a Prefect home of its own (each pytest-xdist worker has one: its ephemeral servers keep their
    database there), no telemetry, and warnings only."""
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    # Prefect's 20 s for its temporary server to start is too little on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session", autouse=True)
def bytecode_cache(tmp_path_factory):
    """A bytecode cache for every process the tests start (img2dataset's spawned workers, torchrun and
    its ranks, Prefect servers, CLI subprocesses), where the virtualenv has none.

    `uv sync` compiles the virtualenv (pyproject: tool.uv compile-bytecode). Installed otherwise,
    without .pyc files, and with PYTHONDONTWRITEBYTECODE set, each such process would compile torch,
    pandas and open_clip from source again (~8 s per process). Then an unset variable plus a prefix
    in a temporary folder lets the first process compile and the rest reuse it, without writing into
    the virtualenv. (A prefix hides the virtualenv's own .pyc files, so it is set only when they are
    missing.)"""
    import importlib.util

    import torch

    mp = pytest.MonkeyPatch()
    if not Path(importlib.util.cache_from_source(torch.__file__)).exists():
        mp.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        mp.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def make_random_checkpoint():
    """make(folder, seed=, step=1, run_name=) -> the CheckpointRef of one checkpoint of a randomly
    initialised (seeded) tiny model in the run folder `folder`, as the trainer writes one."""
    def make(folder, *, seed: int, step: int = 1, run_name: str = "rand"):
        import torch

        from cloob.model import create_model, model_config
        from cloob.train.checkpoint import CheckpointStore

        arch = "cloob-tiny-vit"
        torch.manual_seed(seed)
        model, *_ = create_model(arch)
        return CheckpointStore(str(folder)).save(step, model.state_dict(), {"model_cfg": model_config(arch)}, {},
                                                 {"arch": arch, "method": "cloob", "run_name": run_name}, keep=1)
    return make


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory):
    """make_shards(n, shard_size, seed, image_size=32) -> a folder of n synthetic samples in shards of
    shard_size (synthetic.write_shards), made once per session for each set of arguments. Read-only:
    a test that writes into its data folder makes its own."""
    made: dict[tuple, Path] = {}

    def make(n: int, shard_size: int, seed: int, image_size: int = 32) -> Path:
        key = (n, shard_size, seed, image_size)
        if key not in made:
            d = tmp_path_factory.mktemp(f"shards-{n}-{shard_size}-{seed}-{image_size}px")
            synthetic.write_shards(d, n, shard_size=shard_size, image_size=image_size, seed=seed)
            made[key] = d
        return made[key]

    return make


@pytest.fixture(scope="session")
def shards_dir(make_shards) -> Path:
    """Four finished synthetic shards of 12 samples each (00000.tar .. 00003.tar + stats). Read-only."""
    return make_shards(48, 12, seed=1)


@pytest.fixture
def garbage_shards(tmp_path):
    """A valid tar of 200 random-byte .jpg/.txt members (and a stats file that promises 100 samples)."""
    import json
    import tarfile

    d = tmp_path / "garbage"
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w") as tar:
        for i in range(100):
            for ext in ("jpg", "txt"):
                data = os.urandom(2000)
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (d / "00000_stats.json").write_text(json.dumps({"successes": 100}))
    return d


@pytest.fixture(scope="session")
def s3_server() -> str:
    """Endpoint URL of a moto S3 server on 127.0.0.1 (state lives as long as the session)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """An s3fs filesystem on the local server, with the environment set so that plain
    fsspec.open('s3://...') inside library code reaches it too.

    AWS_ENDPOINT_URL is read by botocore each time a client is created, so setting it here works
    (checked with s3fs 2026.9.0 / aiobotocore 3.10 / botocore 1.43; AWS_ENDPOINT_URL_S3 works too).
    FSSPEC_S3_ENDPOINT_URL does not: fsspec reads FSSPEC_* variables once, when it is imported.
    """
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would keep its old endpoint
    yield s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing")
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port of 127.0.0.1 for the module (tests/prefect_stack.py's
    Server; no UI; of the background services only the task-run recorder, which turns the clients'
    task-run events into the task runs that the API and the UI's graph show); its database lives in
    a temporary PREFECT_HOME. `.url` is its API."""
    from tests.prefect_stack import FAKE_SECRET, Server

    home = tmp_path_factory.mktemp("prefect-server-home")
    server = Server(home, off=(*Server.OFF, "EVENT_PERSISTER"), PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED="true",
                    AWS_ACCESS_KEY_ID="fake-key-id", AWS_SECRET_ACCESS_KEY=FAKE_SECRET)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gpu_workers(prefect_server, tmp_path_factory):
    """Two process workers, gpu-a and gpu-b, on prefect_stack.GPU_TEST_POOL, where `cloob deploy
    --gpu-pool` has put cloob-train/gpu and evaluate-checkpoints/gpu (store: a temporary folder). Each
    takes one run at a time (`--limit 1`, as `cloob deploy` tells GPU workers to) and polls every
    3 s, not every 10 s (Prefect's default). Started once for the module, stopped at its end:
    {"url", "store", "logs": {name: log file}}."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main as cloob_main
    from tests.prefect_stack import FAKE_SECRET, GPU_TEST_POOL, Worker

    url = prefect_server.url
    home = tmp_path_factory.mktemp("gpu-workers")
    store = home / "store"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        # Two training slots, one per worker: a study's cells train side by side.
        assert cloob_main(["deploy", "--store", str(store), "--spec", "demo", "--recipe", "tiny", "--downstream", "shapes",
                            "--gpu-pool", GPU_TEST_POOL, "--train-slots", "2"]) == 0
    workers = []
    try:
        workers += [Worker(url, GPU_TEST_POOL, name, home, AWS_ACCESS_KEY_ID="fake-key-id",
                           AWS_SECRET_ACCESS_KEY=FAKE_SECRET) for name in ("gpu-a", "gpu-b")]
        with SyncPrefectClient(api=url) as client:  # both polling before a test hands them work
            for w in workers:
                w.wait_online(client, GPU_TEST_POOL)
        yield {"url": url, "store": store, "logs": {w.name: w.log_path for w in workers}}
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.stop()


@pytest.fixture
def drain_prefect_clients():
    """After a test that ran flows in this process: their last logs and events go to the server while
    it is up (at exit, with the module's server gone, Prefect would retry them for about a minute)."""
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """serve(folder) -> base URL of a ThreadingHTTPServer on 127.0.0.1 serving that folder."""
    servers = []

    def serve(directory) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


ESCAPE_REASON = "Oops \x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31mRED\x1b[0m"
BOMB_SIDE = 30000


@functools.cache
def bomb_png() -> bytes:
    """A 30000 x 30000 8-bit grayscale PNG of zeros, 875 KB: decoded, 900 MB (fault report B17).
    Written row by row with zlib, as no image library would hold it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, rows = zlib.compressobj(9), b"\0" * ((BOMB_SIDE + 1) * 1000)  # each row: filter byte 0, then pixels
    data = b"".join(z.compress(rows) for _ in range(BOMB_SIDE // 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


class _BadCasesHandler(DemoHandler):
    """Demo pictures plus the failure modes of real image URLs (see `image_server`)."""

    def route(self, path: str):
        self.server.requests.append(path)
        if path == "/bad/404.jpg":
            return 404, b"not found\n", "text/plain"
        if path == "/bad/not-an-image.jpg":
            return 200, b"<html><body>this is a web page, not a picture</body></html>\n", "image/jpeg"
        if path == "/bad/truncated.jpg":
            body, _ = render(7, 64, 2, 0)
            return 200, body[: len(body) // 2], "image/jpeg"
        if path == "/bad/huge-area.jpg":  # small file, 2000 x 2000 pixels
            buf = io.BytesIO()
            Image.new("RGB", (2000, 2000), (200, 30, 30)).save(buf, format="JPEG", quality=50)
            return 200, buf.getvalue(), "image/jpeg"
        if path == "/bad/bomb.png":
            return 200, bomb_png(), "image/png"
        if path == "/bad/too-many-bytes.jpg":
            return 200, b"\xff\xd8" + os.urandom(300_000) + b"\xff\xd9", "image/jpeg"
        if path.startswith("/flaky/"):  # 503 on the first request for each path, then a picture
            with self.server.lock:
                first = path not in self.server.flaky_seen
                self.server.flaky_seen.add(path)
            if first:
                return 503, b"busy\n", "text/plain"
            return super().route(path.removeprefix("/flaky"))
        return super().route(path)

    def do_GET(self):  # noqa: N802
        if self.path.endswith("/bad/escape-reason.jpg"):
            # A reason phrase that retitles the window, clears the screen and turns the text red.
            self.server.requests.append("/bad/escape-reason.jpg")
            self.send_response(500, ESCAPE_REASON)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.endswith("/bad/trickle.jpg"):
            self.server.requests.append("/bad/trickle.jpg")
            # Headers promise 100 kB, then one byte every 0.2 s for as long as the client stays.
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                self.wfile.write(b"\xff\xd8")
                while not self.server.stopping.is_set():
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        super().do_GET()


@pytest.fixture
def image_server():
    """A DemoServer on 127.0.0.1 serving demo pictures at /<seed>/<size>/<items>/<i>.jpg, plus
    /bad/{404,not-an-image,truncated,huge-area,too-many-bytes,trickle,escape-reason}.jpg (the last: 500
    with ESCAPE_REASON as its reason phrase), /bad/bomb.png (bomb_png) and /flaky/... (503 once).
    `.requests` lists the paths asked for, in order."""
    server = DemoServer(_BadCasesHandler)
    server.httpd.requests = []
    server.httpd.flaky_seen = set()
    server.httpd.lock = threading.Lock()
    server.httpd.stopping = threading.Event()
    with server:
        try:
            yield server
        finally:
            server.httpd.stopping.set()


# What makes a test slow: it starts one of these (the README's quick loop is `pytest -m "not slow"`).
_SLOW_COMMANDS = {
    "torchrun": ("torch.distributed.run", "cloob.run.torchrun"),
    "img2dataset": ("cloob.prepare.download.fetch", "img2dataset"),
    "the demo": ("flows.cli demo",),
    "a Prefect server": ("prefect server", "uvicorn", "prefect worker"),
}
_running: dict = {"item": None, "started": []}


def _program(args) -> str:
    """What a command runs: `-m module [subcommand]`, or the program and its first argument (not the
    arguments that follow, which may name modules without running them)."""
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    if len(argv) > 2 and argv[1] == "-m":
        return " ".join(argv[2:4])
    return " ".join([os.path.basename(argv[0]), *argv[1:2]]) if argv else ""


def _record_heavy_starts():
    import subprocess

    original = subprocess.Popen._execute_child

    def guarded(self, args, *rest, **kw):
        line = _program(args)
        item = _running["item"]
        if item is not None and not item.get_closest_marker("slow"):
            _running["started"] += [what for what, needles in _SLOW_COMMANDS.items() if any(n in line for n in needles)]
        return original(self, args, *rest, **kw)

    subprocess.Popen._execute_child = guarded


_record_heavy_starts()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running["item"], _running["started"] = item, []  # module fixtures set up now count for this test
    yield
    _running["item"] = None


@pytest.fixture(autouse=True)
def slow_marker_is_honest():
    """A test that starts torchrun, img2dataset, the demo or a Prefect server (an ephemeral one too),
    itself or through a fixture it is the first to use, must be marked slow: this fails it otherwise."""
    yield
    if started := sorted(set(_running["started"])):
        pytest.fail(f"this test started {', '.join(started)}: mark it @pytest.mark.slow", pytrace=False)



# The files that take longest, longest first. pytest-xdist gives each worker whole files (--dist
# loadfile) in collection order (--no-loadscope-reorder; its default order, most tests first, started
# the demo last and left one worker idle for minutes at the end), and a worker takes its next file as
# soon as 2 or fewer of its tests are left (at once, for a file of 1 or 2 tests: the demo, the weekly
# retrain): the long files go first, so that what is left at the end is short. Measured: the
# 2026-12-07 clean-clone run (the demo 477 s, the deployment faults about 300 s, the weekly retrain
# 231 s, the Ray tests of test_distributors about 200 s), test_k8s_sigterm alone (1 min 48 s) and the
# 2026-12-01 order of the rest. The rest keep their order, after these.
LONGEST_FIRST = ["test_demo.py", "test_deployment_faults.py", "test_launch.py", "test_weekly_retrain.py", "test_prepare.py",
                 "test_distributors.py", "test_gpu_pool.py", "test_faults.py", "test_lock.py", "test_train.py",
                 "test_retrain_cli.py", "test_k8s_sigterm.py", "test_deploy_server.py", "test_distributed.py", "test_evaluate.py",
                 "test_data.py", "test_k8s_node.py", "test_imports.py", "test_flows.py", "test_eval_threads.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order
