"""Many evaluations at once in one process, as the evaluate-checkpoints flow runs them (Prefect task
threads), each with DataLoader worker processes, while other threads use torch's random generator.

Forking a process whose other threads hold a lock (torch's generator mutex, taken by any random op)
gives a worker that waits for that lock forever: seen as `cloob demo` hanging in evaluation, the
worker stuck in `torch.manual_seed` inside `_worker_loop`. The workers must not be forked from a
threaded process, and a DataLoader must never wait without a limit.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cloob.data import synthetic
from cloob.data.workers import loader_kwargs, worker_context
from cloob.errors import CloobError
from cloob.evaluate.datasets import loader, open_classification_set
from cloob.evaluate.models import load_model
from cloob.evaluate.runner import EvalSettings, evaluate_zeroshot

ARCH = "cloob-tiny-vit"
PARALLEL = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_random_checkpoint) -> str:
    run = tmp_path_factory.mktemp("run")
    make_random_checkpoint(run, seed=3, run_name="threads")
    return str(run)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    synthetic.write_class_folders(d, per_class=2, image_size=32, seed=5)
    return d


class _GeneratorTraffic:
    """Threads that keep torch's default CPU generator (and its mutex) busy, as a training step,
    an augmentation or another evaluation's sampling would."""

    def __init__(self, n: int = 2):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self):
        while not self.stop.is_set():
            torch.randn(4096)
            torch.manual_seed(1)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


@pytest.mark.slow
def test_parallel_evaluations_with_workers_all_finish(checkpoint, shapes):
    ds = open_classification_set("shapes", str(shapes))
    settings = EvalSettings(batch_size=4, workers=1, limit=None)

    def one(_):
        em = load_model(checkpoint)
        return evaluate_zeroshot(em, ds, settings, progress=False)

    t0 = time.monotonic()
    with _GeneratorTraffic(), ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(one, i) for i in range(2 * PARALLEL)]
        rows = [f.result(timeout=max(1.0, 600 - (time.monotonic() - t0))) for f in futures]
    assert len(rows) == 2 * PARALLEL
    assert all(r["n_images"] == 36 and r["n_skipped"] == 0 for r in rows)
    assert len({r["top1"] for r in rows}) == 1  # one model, one set: the same number every time


def test_threaded_process_does_not_fork_workers():
    # The main thread alone may fork (fast, nothing else can hold a lock); with another thread
    # running, workers come from a fork server that has never run anything but imports.
    assert worker_context() is None or threading.active_count() > 1
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (ready.set(), stop.wait()), daemon=True)
    t.start()
    try:
        ready.wait()
        assert worker_context().get_start_method() == "forkserver"
    finally:
        stop.set()
        t.join()


class _Stuck(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        time.sleep(3600)


def test_a_stuck_worker_gives_one_error_not_a_hang():
    t0 = time.monotonic()
    with pytest.raises(CloobError) as e:
        for _ in loader(_Stuck(), 2, 1, timeout_s=3, what="a stuck set"):
            pass
    assert time.monotonic() - t0 < 120
    assert "a stuck set" in str(e.value) and "3 s" in str(e.value) and e.value.fix


class _Env(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import os

        return os.environ.get("CLOOB_TEST_VALUE", "unset"), 0, i


def _as_list(batch):
    return batch


def test_fork_server_workers_see_the_environment_of_now(monkeypatch):
    """Credentials or AWS_ENDPOINT_URL set after the fork server started still reach the workers."""
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (ready.set(), stop.wait()), daemon=True)
    t.start()
    try:
        ready.wait()
        for value in ("first", "second"):  # the server starts for the first; the second comes later
            monkeypatch.setenv("CLOOB_TEST_VALUE", value)
            dl = torch.utils.data.DataLoader(_Env(), batch_size=2, num_workers=1, collate_fn=_as_list,
                                             **loader_kwargs(1))
            assert [x[0] for batch in dl for x in batch] == [value, value]
    finally:
        stop.set()
        t.join()
