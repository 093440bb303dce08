"""`cloob demo`, the README's main command, end to end as a user runs it (a subprocess with its own
ephemeral Prefect under the store): stopped with SIGTERM during training (it and every process it
started are gone at once), run again to the end (training resumes from its checkpoint), every seed's
run of both models clearly above chance; then run once more, doing nothing.

It trains two seeds per model (`--seeds 2`), so that the margin holds on more than one seed, not on
one lucky order, for 150 steps instead of the default 300: the demo is the suite's largest single
cost (about 290 s of CPU with three seeds, 2026-12-07; a third seed added ~70 s of it and no path the
second does not take). Measured 2026-12-06 (`cloob demo --seeds 3 --steps 150`, 2 min 50 s): CLOOB
24.4 / 29.2 / 43.1% on shapes (4.4x chance or more) and 50.8 / 60.0 / 100% on colors (3.0x or more);
CLIP 42.8-46.9% and 100%. The assertion is 2x chance on every run: a third below the lowest seed
(colors: 33.3% against 50.8%), room for another CPU's arithmetic, which moves CLOOB within its spread
over seeds (BENCHMARKS.md, "The demo").
"""

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import child_env

from cloob.registry import Registry
from cloob.results.table import read_rows
from cloob.run.launch import still_running

CHANCE = {"shapes": 1 / 18, "colors": 1 / 6}
STEPS = 150
SEEDS = 2
MARGIN = 2.0  # x chance, on every run
# The demo takes about 2.5 min (2 seeds x 150 steps) on an idle 2-core machine, twice that on a busy one. The
# budgets below are for one step each; the module's own limit covers the sum, so pytest's global 600 s
# (which would end the fixture before its budgets) does not apply here.
FIRST_CHECKPOINT_S, RERUN_S, NOOP_S = 600, 900, 300
pytestmark = [pytest.mark.slow, pytest.mark.timeout(FIRST_CHECKPOINT_S + RERUN_S + NOOP_S + 120)]


@pytest.fixture(scope="module")
def env() -> dict:
    env = child_env()  # bytecode cache: conftest's bytecode_cache
    for var in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_LOGGING_LEVEL"):  # the demo picks its own
        env.pop(var, None)
    return env


def _demo(store: Path, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "demo", "--store", str(store), "--steps", str(STEPS),
                             "--seeds", str(SEEDS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen):
    """Whatever happens in the block (a failed assertion, pytest's timeout), the demo and every process
    it started are gone afterwards: a timed-out test leaves nothing running."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                tree = []
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            proc.wait()
            psutil.wait_procs(tree, timeout=30)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _checkpoints(store: Path) -> list[Path]:
    """Complete checkpoints: a step folder appears with its first file, meta.json comes last."""
    return sorted(p.parent for p in store.glob("runs/*/checkpoints/step_*/meta.json"))


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory, env):
    """The demo stopped with SIGTERM (to its own process, as `kill`, systemd or tini send it) once the
    first model has a checkpoint, then run again to the end."""
    store = tmp_path_factory.mktemp("demo") / "store"
    with _reaped(_demo(store, env)) as first:
        deadline = time.monotonic() + FIRST_CHECKPOINT_S
        while not _checkpoints(store):
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, f"no checkpoint within {FIRST_CHECKPOINT_S} s"
            time.sleep(0.5)
        descendants = psutil.Process(first.pid).children(recursive=True)
        assert any("cloob.train" in " ".join(_cmdline(p)) for p in descendants)
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "SIGTERM received, stopping" in out, out[-3000:]
        # torchrun, its ranks and their workers, img2dataset, the Prefect server: all stopped with it.
        _, alive = psutil.wait_procs(descendants, timeout=60)
        assert not still_running(alive), [p.cmdline()[:4] for p in still_running(alive)]
    killed_at = [p.name for p in _checkpoints(store)]

    with _reaped(_demo(store, env)) as second:
        out, _ = second.communicate(timeout=RERUN_S)
    assert second.returncode == 0, out[-5000:]
    return store, out, killed_at


def test_the_demo_killed_and_rerun_finishes_from_the_checkpoint_above_chance(finished_demo):
    store, out, killed_at = finished_demo
    assert killed_at and all(name < f"step_{STEPS:08d}" for name in killed_at), killed_at
    assert "resuming from step" in out, out[-5000:]
    assert "demo: already done" in out  # the shards were finished before the kill

    rows = read_rows(str(store / "results")).to_pylist()
    acc = {(r["run_id"], r["dataset"]): r["main_value"] for r in rows}
    methods = {r["run_id"]: r["method"] for r in rows}
    assert sorted(methods.values()) == sorted(["cloob", "clip"] * SEEDS) and len(acc) == 2 * SEEDS * len(CHANCE), acc
    for (run, dataset), value in acc.items():
        # Every seed's run of each method clearly above chance, not one lucky order.
        assert value >= MARGIN * CHANCE[dataset], (run, dataset, value)  # main_value is a fraction
    assert all(r["step"] == STEPS and r["pretraining_data"] == "demo" for r in rows)
    assert f"Over {SEEDS} seeds (mean ± std, then each seed):" in out

    reg = Registry(str(store / "registry"))
    assert len(reg.entries()) == 2 * SEEDS and {"latest", "best-shapes", "best-colors"} <= set(reg.aliases())
    assert (store / "prefect" / "prefect.db").exists()  # the runs, for `prefect server start`
    # The UI command names the API URL with the port, so that it also works on another port.
    for what in ("Zero-shot classification", "results table:", "registry:", f"PREFECT_HOME={store}/prefect",
                 "PREFECT_UI_API_URL=http://127.0.0.1:4200/api prefect server start --port 4200"):
        assert what in out, what


def test_the_demo_run_again_does_nothing(finished_demo, env):
    store, _, _ = finished_demo
    before = {p: p.stat().st_mtime_ns for p in _checkpoints(store)}
    n_rows = len(read_rows(str(store / "results"), latest=False))
    with _reaped(_demo(store, env)) as again:
        out, _ = again.communicate(timeout=NOOP_S)
    assert again.returncode == 0, out[-5000:]
    assert {p: p.stat().st_mtime_ns for p in _checkpoints(store)} == before
    assert len(read_rows(str(store / "results"), latest=False)) == n_rows  # nothing evaluated again
    # Each step says which run (named by its method) or set it skipped, and the content key that matched.
    for step in (r"prepare demo: already done \(content key [0-9a-f]{12}\)", r"train tiny-cloob-\S+: already done",
                 r"train tiny-clip-\S+: already done", r"evaluate tiny-cloob-\S+ on shapes: already done",
                 r"evaluate tiny-clip-\S+ on colors: already done"):
        assert re.search(step, out), (step, out[-3000:])
    assert "resuming" not in out and "cloob train:" not in out
