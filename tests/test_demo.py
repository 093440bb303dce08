"""`cloob demo`, the README's main command, end to end as a user runs it (a subprocess with its own
ephemeral Prefect under the store): killed during training, run again to the end (training resumes
from its checkpoint), both models clearly above chance; then run once more, doing nothing.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cloob.run.launch import still_running
from cloob.registry import Registry
from cloob.results.table import read_rows

ROOT = Path(__file__).parents[1]
CHANCE = {"shapes": 1 / 18, "colors": 1 / 6}


@pytest.fixture(scope="module")
def env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # bytecode cache: conftest's bytecode_cache
    for var in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_LOGGING_LEVEL"):  # the demo picks its own
        env.pop(var, None)
    return env


def _demo(store: Path, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "demo", "--store", str(store)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _checkpoints(store: Path) -> list[Path]:
    return sorted(store.glob("runs/*/checkpoints/step_*"))


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory, env):
    """The demo killed (its whole process group, SIGKILL) once the first model has a checkpoint,
    then run again to the end."""
    store = tmp_path_factory.mktemp("demo") / "store"
    first = _demo(store, env)
    try:
        deadline = time.monotonic() + 400
        while not _checkpoints(store):
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint within 400 s"
            time.sleep(0.5)
        descendants = psutil.Process(first.pid).children(recursive=True)
        os.killpg(first.pid, signal.SIGKILL)  # as a closed terminal would: no handler runs
        first.wait()
        # torchrun and its ranks run in sessions of their own; they stop because their parent died.
        _, alive = psutil.wait_procs(descendants, timeout=60)
        assert not still_running(alive), alive
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    killed_at = [p.name for p in _checkpoints(store)]

    second = _demo(store, env)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-5000:]
    return store, out, killed_at


def test_the_demo_killed_and_rerun_finishes_from_the_checkpoint_above_chance(finished_demo):
    store, out, killed_at = finished_demo
    assert killed_at and all(name < "step_00000500" for name in killed_at), killed_at
    assert "resuming from step" in out, out[-5000:]
    assert "demo: already done" in out  # the shards were finished before the kill

    rows = read_rows(str(store / "results")).to_pylist()
    acc = {(r["method"], r["dataset"]): r["main_value"] for r in rows}
    assert set(acc) == {(m, d) for m in ("cloob", "clip") for d in CHANCE}, acc
    for (method, dataset), value in acc.items():
        # Clearly above chance: at least 1.6 x chance (the demo gives CLOOB 5.8x on shapes, 4.6x on colors).
        assert value >= 1.6 * CHANCE[dataset], (method, dataset, value)  # main_value is a fraction
    assert all(r["step"] == 500 and r["pretraining_data"] == "demo" for r in rows)

    reg = Registry(str(store / "registry"))
    assert len(reg.entries()) == 2 and {"latest", "best-shapes", "best-colors"} <= set(reg.aliases())
    assert (store / "prefect" / "prefect.db").exists()  # the runs, for `prefect server start`
    for what in ("Zero-shot classification", "results table:", "registry:", f"PREFECT_HOME={store}/prefect"):
        assert what in out, what


def test_the_demo_run_again_does_nothing(finished_demo, env):
    store, _, _ = finished_demo
    before = {p: p.stat().st_mtime_ns for p in _checkpoints(store)}
    n_rows = len(read_rows(str(store / "results"), latest=False))
    again = _demo(store, env)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-5000:]
    assert {p: p.stat().st_mtime_ns for p in _checkpoints(store)} == before
    assert len(read_rows(str(store / "results"), latest=False)) == n_rows  # nothing evaluated again
    for step in ("prepare demo: already done", "train tiny (cloob): already done", "train tiny (clip): already done",
                 "evaluate shapes: already done", "evaluate colors: already done"):
        assert out.count(step) >= 1, (step, out[-3000:])
    assert "resuming" not in out and "cloob train:" not in out
