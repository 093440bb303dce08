"""cloob.run.launch with real torchrun on generated shards: a 2-process run with its log and progress, a
deadline that kills the whole process group and a rerun that resumes, cancellation, failures; and
`cloob train` itself: signals reach the whole tree, a frozen rank fails the run naming it, and every
failure is one message.

Runs are few and tiny: most of a launch is importing torch and the trainer, once, in torchrun (its ranks
are forks of it, cloob.run.rank_fork).
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import child_env, rank_number

from cloob.errors import CloobError
from cloob.run import reports
from cloob.run.launch import _MetricsTail, _resolve_run, _sweep_report_dirs, build_command, launch, still_running
from cloob.run.state import identify
from cloob.run.watchdog import PHASE_FLOOR_S, STEP_FLOOR_S, Watchdog
from cloob.train.checkpoint import CheckpointStore

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def env() -> dict:
    """The variables the runs get; a bytecode cache in a folder of its own (PYTHONPYCACHEPREFIX:
    conftest's bytecode_cache sets one where the virtualenv has no .pyc files) is warmed first, so
    that deadlines in these tests do not measure the compiler (~13 s before the first step cold,
    ~5 s warm). Without one the virtualenv's own .pyc files serve, and a warming process would only
    import torch once more (~5 s of CPU)."""
    env = child_env({}, OMP_NUM_THREADS="1")
    if os.environ.get("PYTHONPYCACHEPREFIX"):
        subprocess.run([sys.executable, "-c", "import cloob.train, torch.distributed.run, torch.utils.tensorboard"],
                       env={**os.environ, **env}, check=True)
    return env


@pytest.fixture(scope="module")
def shards(make_shards):
    return make_shards(160, 40, seed=7)  # 4 shards


def _overrides(shards, out, *extra):
    return [f"data.train={shards}", f"train.output={out}", "train.batch_size=8", "train.log_every=1",
            "data.workers=1", "data.shuffle_buffer=40", "schedule.warmup_steps=2", *extra]


def _assert_group_gone(pgid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def _assert_run_gone(pgid: int, seen: dict, at_least: int) -> None:
    """torchrun's group is gone and so is every process seen under it while it ran (the ranks run in
    sessions of their own, out of torchrun's group)."""
    _assert_group_gone(pgid)
    assert len(seen) >= at_least, seen  # the check saw the ranks and their workers, not just torchrun
    assert not still_running(seen.values()), [(p.pid, p.cmdline()[:4]) for p in still_running(seen.values())]


class _Recorder:
    def __init__(self):
        self.lines: list[str] = []
        self.progress: list[dict] = []
        self.threads: set[int] = set()
        self.procs: dict[int, psutil.Process] = {}  # the run's processes, seen at progress lines

    def on_line(self, line: str) -> None:
        self.threads.add(threading.get_ident())
        self.lines.append(line)

    def on_progress(self, p: dict) -> None:
        self.threads.add(threading.get_ident())
        self.progress.append(p)
        for c in psutil.Process().children():  # torchrun and what it started; not, say, a Prefect server
            try:
                if "cloob.run.torchrun" in c.cmdline():
                    for p in [c, *c.children(recursive=True)]:
                        self.procs.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass


@pytest.mark.slow
def test_two_process_run_reports_lines_and_progress(tmp_path, shards, env):
    rec = _Recorder()
    result = launch("tiny", _overrides(shards, tmp_path, "train.steps=12", "train.checkpoint_every=6"),
                    nproc_per_node=2, env=env, on_line=rec.on_line, on_progress=rec.on_progress)
    assert result.returncode == 0, "\n".join(result.log_tail)
    assert result.ok and not result.timed_out and not result.cancelled
    assert result.check() is result
    assert result.checkpoint == str(Path(result.run_dir) / "checkpoints" / "step_00000012")
    assert CheckpointStore(result.run_dir).latest().step == 12
    assert any("2 x 8 = global batch 16" in line for line in rec.lines), rec.lines
    assert any(line.startswith("done: 12 steps") for line in rec.lines)
    assert rec.threads == {threading.get_ident()}  # callbacks run in the caller's thread
    steps = [p["step"] for p in rec.progress]
    assert steps == sorted(set(steps)) and steps[-1] == 12, steps
    assert all(p["total_steps"] == 12 and p["loss"] > 0 and "samples_per_s" in p and "lr" in p for p in rec.progress)
    assert result.last_progress == rec.progress[-1]
    assert result.command[-1] == "train.progress=false" and "--standalone" in result.command


# The ranks' time to finish the step and write its checkpoint after the deadline's SIGTERM. 5 s was
# not always enough on a loaded 2-core machine (a clean-clone run, 2026-12-07: the rank was killed
# before its report); a fast run does not wait for it.
GRACE_S = 20.0


class _Clock:
    """The launcher's clock (its module's `time`): the real one, moved forward by `jump` seconds."""

    def __init__(self):
        self.jump = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.jump

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.slow
def test_deadline_kills_the_group_and_a_rerun_resumes(tmp_path, shards, env, monkeypatch):
    # The deadline must fall after a checkpoint and before the end, whatever the machine's speed: a
    # fixed one missed the first checkpoint on a loaded 2-core machine (each retry a whole run more).
    # So the launcher's clock jumps past the deadline once a checkpoint is complete, seen from the
    # progress callback, and the launcher's own loop sees the deadline at its next tick. The rerun has
    # the same overrides (another train.steps is another recipe, which the trainer refuses to resume).
    deadline, steps = 600.0, 200
    env = {**env, "LAUNCH_TEST_SECRET": "s3cr3t-value"}
    overrides = _overrides(shards, tmp_path / "out", f"train.steps={steps}", "train.checkpoint_every=4")
    run_dir = _resolve_run("tiny", identify("tiny", overrides))[0]  # as launch resolves it
    clock, rec, released = _Clock(), _Recorder(), []
    monkeypatch.setattr("cloob.run.launch.time", clock)

    def jump_after_a_checkpoint(row: dict) -> None:
        rec.on_progress(row)
        if not released and CheckpointStore(run_dir).latest() is not None:
            released.append(time.monotonic())
            clock.jump = deadline

    result = launch("tiny", overrides, deadline_s=deadline, grace_s=GRACE_S, env=env, on_line=rec.on_line,
                    on_progress=jump_after_a_checkpoint)
    ended = time.monotonic()
    assert result.timed_out and not result.cancelled and result.returncode != 0
    assert released, rec.lines  # a checkpoint came before the end
    assert result.seconds >= deadline and ended - released[0] < GRACE_S + 35.0
    # No process of the run survives: torchrun, the rank and its DataLoader worker.
    _assert_run_gone(result.pgid, rec.procs, at_least=3)
    assert Path(result.run_dir) == Path(run_dir)
    stopped_at = CheckpointStore(result.run_dir).latest().step
    # The SIGTERM at the deadline stopped the rank after a step, with a checkpoint of that step.
    assert result.preempted is not None and result.preempted["step"] == stopped_at
    assert 4 <= stopped_at < steps and result.last_progress["step"] >= stopped_at
    with pytest.raises(CloobError, match="deadline") as e:
        result.check()
    assert "resume" in e.value.fix
    assert not any("s3cr3t-value" in x for x in [*result.log_tail, *result.command, str(result)])

    rec = _Recorder()
    again = launch("tiny", overrides, env=env, on_line=rec.on_line, on_progress=rec.on_progress)
    assert again.returncode == 0, "\n".join(again.log_tail)
    assert again.run_dir == result.run_dir
    assert any(f"resuming from step {stopped_at}" in line for line in rec.lines), rec.lines
    assert CheckpointStore(again.run_dir).latest().step == steps
    seen = [p["step"] for p in rec.progress]
    assert seen[0] >= stopped_at and seen[-1] == steps, seen  # nothing from the killed attempt's past
    logged = [json.loads(line)["step"] for line in (Path(again.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # one trajectory: the steps after the checkpoint redone once


@pytest.mark.slow
def test_stop_event_cancels_and_kills_the_group(tmp_path, shards, env):
    stop = threading.Event()
    setters = []
    rec = _Recorder()

    def on_progress(p: dict) -> None:  # cancel once training is under way, from another thread
        rec.on_progress(p)
        if not setters:
            setters.append(threading.Thread(target=stop.set))
            setters[-1].start()

    result = launch("tiny", _overrides(shards, tmp_path, "train.steps=100000"), stop=stop, env=env, grace_s=5.0,
                    on_progress=on_progress)
    for t in setters:
        t.join()
    assert setters and stop.is_set()
    assert result.cancelled and not result.timed_out and result.returncode != 0
    assert result.last_progress is not None and 0 < result.last_progress["step"] < 100000
    _assert_run_gone(result.pgid, rec.procs, at_least=3)  # torchrun, the rank and its DataLoader worker
    with pytest.raises(CloobError, match="cancelled"):
        result.check()


@pytest.mark.slow
def test_an_interrupt_in_the_caller_kills_the_whole_run_and_is_raised(tmp_path, shards, env, monkeypatch):
    started = []

    class Popen(subprocess.Popen):  # to learn torchrun's process group
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    rec = _Recorder()

    def ctrl_c(p: dict) -> None:
        # Ctrl-C in the calling thread once training is under way (raised from the callback, which
        # runs in that thread: deterministic, unlike a timer racing the start-up).
        rec.on_progress(p)
        raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch("tiny", _overrides(shards, tmp_path, "train.steps=100000"), env=env, grace_s=5.0,
               on_progress=ctrl_c)
    assert time.monotonic() - t0 < 120
    assert len(started) == 1 and started[0].returncode is not None
    _assert_run_gone(started[0].pid, rec.procs, at_least=3)  # torchrun, the rank and its DataLoader worker


_LAUNCHER = """
import sys
from cloob.run.launch import launch
launch("tiny", sys.argv[1:], nproc_per_node=2)
"""


@pytest.mark.slow
def test_a_killed_launcher_takes_the_run_with_it(tmp_path, shards, env):
    # The process that launched torchrun dies without stopping it (SIGKILL: no handler runs):
    # torchrun gets SIGTERM from the kernel and stops its ranks, instead of training on unsupervised.
    overrides = _overrides(shards, tmp_path, "train.steps=100000")
    launcher = psutil.Popen([sys.executable, "-c", _LAUNCHER, *overrides], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run: dict[int, psutil.Process] = {}
    try:
        metrics = _resolve_run("tiny", overrides)[1]
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().strip()):  # training is under way
            assert launcher.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        run.update((p.pid, p) for p in launcher.children(recursive=True))
        assert len(run) >= 5, run  # torchrun, two ranks, a DataLoader worker each
        launcher.kill()
        launcher.wait()
        gone, alive = psutil.wait_procs(list(run.values()), timeout=45)
        alive = still_running(alive)  # orphans are reaped by init (or not at all in some containers)
        assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    finally:  # nothing left behind for the next test, whatever happened
        for p in [launcher, *run.values()]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.slow
def test_trainer_error_is_in_check(tmp_path, garbage_shards, env):
    # Valid as a recipe and as a plan (a tar with a stats file), refused by the trainer at its first
    # batch: no member decodes.
    lines = []
    result = launch("tiny", _overrides(garbage_shards, tmp_path / "out"), env=env,
                    on_line=lines.append)
    assert result.returncode != 0 and not result.timed_out and not result.cancelled
    assert result.checkpoint is None and result.last_progress is None
    assert result.error["kind"] == "cloob" and result.error["rank"] == 0  # read from the rank's error file
    with pytest.raises(CloobError) as e:
        result.check()
    assert e.value.problem.startswith(f"no usable training samples in {garbage_shards}")  # the trainer's, as is
    assert e.value.fix == "check the shards (images, .txt captions) or prepare them again"
    assert not any("error:" in line.lower() or "Traceback" in line for line in lines), lines  # said once: by check
    _assert_group_gone(result.pgid)


def test_a_bad_plan_is_refused_before_torchrun_starts(tmp_path, shards, monkeypatch):
    # The ranks' own plan, made by the launcher: 1000 per rank is more than the 160 samples.
    def no_start(*a, **kw):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(subprocess, "Popen", no_start)
    with pytest.raises(CloobError) as e:
        launch("tiny", _overrides(shards, tmp_path / "out", "train.batch_size=100"), nproc_per_node=2)
    assert e.value.problem == "160 samples are fewer than one global batch (200)"
    assert e.value.fix == "lower train.batch_size or add data"
    assert not (tmp_path / "out").exists()


def test_a_run_folder_in_use_is_refused_before_torchrun_starts(tmp_path, shards, monkeypatch):
    """On one node the launcher looks at the run folder's lock first; on several it cannot (another
    node's rank 0 may hold it for this very run), so that node's torchrun starts."""
    from cloob.config import load_recipe
    from cloob.train.plan import run_lock

    class Started(Exception):
        pass

    def started(*a, **kw):
        raise Started

    monkeypatch.setattr(subprocess, "Popen", started)
    overrides = _overrides(shards, tmp_path / "out")
    with run_lock(load_recipe("tiny", overrides)):  # held by this (live) process
        with pytest.raises(CloobError, match="is in use") as e:
            launch("tiny", overrides)
        assert f"pid {os.getpid()}" in e.value.problem and "train.run_name" in e.value.fix
        with pytest.raises(Started):
            launch("tiny", overrides, nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:29999")


def test_bad_recipe_is_refused_before_anything_starts(tmp_path, shards):
    t0 = time.monotonic()
    with pytest.raises(CloobError, match="train.batch_size"):
        launch("tiny", _overrides(shards, tmp_path / "out", "train.batch_size=0"))
    with pytest.raises(CloobError, match="rdzv_endpoint"):
        launch("tiny", _overrides(shards, tmp_path / "out"), nnodes=2)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "out").exists()


def test_multi_node_command():
    cmd = build_command("tiny", ["train.steps=5"], nproc_per_node=4, nnodes=2, node_rank=1,
                        rdzv_endpoint="node0:29400")
    assert cmd[1:] == ["-m", "cloob.run.torchrun", "--nnodes", "2", "--node_rank", "1", "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", "node0:29400", "--nproc_per_node", "4", "-m", "cloob.train", "tiny",
                       "train.steps=5", "train.progress=false"]
    with pytest.raises(CloobError, match="node_rank"):
        build_command("tiny", [], nnodes=2, node_rank=2, rdzv_endpoint="node0:29400")
    cmd = build_command("tiny", [], max_restarts=2)
    assert cmd[cmd.index("--max_restarts") + 1] == "2" and cmd.index("--max_restarts") < cmd.index("cloob.train")
    assert "--max_restarts" not in build_command("tiny", [])


def test_remote_output_is_followed_in_the_local_metrics_mirror(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the trainer mirrors to .cloob-logs/<run name> in its working folder
    run_dir, metrics, recipe = _resolve_run("tiny", ["train.output=s3://bucket/x/", "train.run_name=r7"])
    assert run_dir == "s3://bucket/x/runs/r7" and recipe.run_id() == "r7"
    assert metrics == tmp_path / ".cloob-logs" / "r7" / "metrics.jsonl"
    run_dir, metrics, _ = _resolve_run("tiny", ["train.output=out", "train.epochs=2", "train.steps=null"])
    assert run_dir.startswith("out/runs/tiny-") and metrics == tmp_path / run_dir / "metrics.jsonl"


def test_metrics_tail_skips_an_earlier_attempt_and_follows_a_rewrite(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')  # a killed attempt
    tail = _MetricsTail(f)
    assert tail.read_new() == []
    tmp = tmp_path / "m.tmp"  # the trainer resumes from step 2: rewrites, then appends
    tmp.write_text('{"step": 1}\n{"step": 2}\n')
    os.replace(tmp, f)
    assert tail.read_new() == [{"step": 2}]
    with open(f, "a") as fh:
        fh.write('{"step": 3}\n{"step": 4}\n{"step"')
    assert tail.read_new() == [{"step": 3}, {"step": 4}]
    with open(f, "a") as fh:
        fh.write(': 5}\n')
    assert tail.read_new() == [{"step": 5}]


# ------------------------------------------------------------------------- `cloob train` itself

def _cli(shards, out, *extra, nproc=1):
    return [sys.executable, "-m", "cloob.cli", "train", "tiny", *_overrides(shards, out, *extra),
            "train.progress=false", f"--nproc-per-node={nproc}"]


def _wait_for_training(metrics: Path, proc, timeout=180) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, f"ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)


def _assert_all_gone(procs: dict, timeout=60.0) -> None:
    """Every one of procs ends within timeout (polled; orphans are reaped by init, or not at all in
    some containers, so a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    while (alive := still_running(procs.values())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, [(p.pid, p.cmdline()[:5]) for p in alive]


def _kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "nproc"), [(signal.SIGTERM, 2), (signal.SIGKILL, 1)], ids=["SIGTERM-2", "SIGKILL-1"])
def test_a_signal_to_cloob_train_stops_its_whole_tree(tmp_path, shards, env, nproc, sig):
    """A signal to the `cloob train` process alone (not its group, as a batch system or `kill PID`
    sends it): torchrun, every rank and their DataLoader workers end; SIGTERM says so in one line.
    (SIGKILL under two ranks: test_a_killed_launcher_takes_the_run_with_it; SIGTERM to a one-rank
    run: the demo's test.)"""
    overrides = _overrides(shards, tmp_path, "train.steps=100000")
    cmd = _cli(shards, tmp_path, "train.steps=100000", nproc=nproc)
    proc = psutil.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        start_new_session=True)
    tree: dict[int, psutil.Process] = {}
    try:
        _wait_for_training(_resolve_run("tiny", overrides)[1], proc)
        tree.update((p.pid, p) for p in proc.children(recursive=True))
        assert len(tree) >= 1 + 2 * nproc, tree  # torchrun, the ranks, a DataLoader worker each
        launcher_dirs = list(Path(tempfile.gettempdir()).glob(f"cloob-run-{proc.pid}-*"))
        assert launcher_dirs
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        # Looked at as soon as the launcher is gone: any launch, in another test process too, sweeps it.
        left = [d for d in launcher_dirs if d.exists()]
        _assert_all_gone(tree)
    finally:
        _kill_all([proc, *tree.values()])
    if sig == signal.SIGKILL:  # left behind by the killed launcher; the next launch removes it
        assert left
        _sweep_report_dirs()  # what every launch does first
        assert not any(d.exists() for d in launcher_dirs)
    else:
        assert not left
    if sig == signal.SIGTERM:  # the ranks stop after their step and write a checkpoint of it
        assert proc.returncode == 143, err
        assert re.fullmatch(r"cloob train: preempted by SIGTERM at step \d+; checkpoint step_\d{8} written; "
                            r"rerun the same command to resume", err.splitlines()[-1]), err
        assert "Traceback" not in err and "error" not in err.lower(), err
    else:
        assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv")
def test_a_killed_uv_run_takes_the_run_with_it(tmp_path, shards, env):
    """`uv run cloob train ...` (one of the two ways the README gives) killed outright: the command it ran stops the run
    instead of training on as an orphan."""
    overrides = _overrides(shards, tmp_path, "train.steps=100000", "train.progress=false")
    cmd = [shutil.which("uv"), "run", "--frozen", "--no-sync", "--project", str(ROOT), "cloob", "train", "tiny",
           *overrides]
    uv = psutil.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      text=True, start_new_session=True)
    tree: dict[int, psutil.Process] = {}
    try:
        _wait_for_training(_resolve_run("tiny", overrides)[1], uv)
        tree.update((p.pid, p) for p in uv.children(recursive=True))
        assert len(tree) >= 4, tree  # cloob, torchrun, the rank, its DataLoader worker
        uv.kill()
        uv.wait()
        _assert_all_gone(tree)
    finally:
        _kill_all([uv, *tree.values()])


def _rank(rec, rank: int):
    """The process of `rank` among the children of the torchrun that `rec` has seen."""
    torchrun = next(q for q in rec.procs.values() if "cloob.run.torchrun" in q.cmdline())
    return next(q for q in torchrun.children() if rank_number(q) == rank)


@pytest.mark.slow
def test_a_frozen_rank_fails_the_run_and_is_named(tmp_path, shards, env):
    """SIGSTOP of rank 1 after its first step (a hung GPU or filesystem): the step watchdog stops the
    run within its limit, names rank 1, and nothing is left running."""
    limit, grace = 10.0, 5.0
    rec = _Recorder()
    frozen: dict = {}

    def on_progress(p: dict) -> None:
        rec.on_progress(p)
        if not frozen:
            rank1 = _rank(rec, 1)
            rank1.suspend()
            frozen.update(proc=rank1, at=time.monotonic())

    try:
        result = launch("tiny", _overrides(shards, tmp_path, "train.steps=100000", f"train.watchdog_s={limit:g}"),
                        nproc_per_node=2, env=env, grace_s=grace, on_progress=on_progress)
        ended = time.monotonic()
    finally:
        if frozen:
            _kill_all([frozen["proc"]])
    assert frozen and not result.ok and not result.cancelled and not result.timed_out
    assert result.stall is not None and result.stall.ranks == [1], result.stall
    assert limit <= ended - frozen["at"] < limit + grace + 45  # the limit, the stop, a loaded machine
    with pytest.raises(CloobError) as e:
        result.check()
    assert "stopped making progress: rank 1 " in e.value.problem and "stopped" in e.value.problem
    assert "\n" not in e.value.problem and "train.watchdog_s" in e.value.fix
    _assert_run_gone(result.pgid, rec.procs, at_least=5)


@pytest.mark.slow
def test_a_rank_killed_outright_is_named_from_torchruns_report(tmp_path, shards, env):
    """A rank that can write no error of its own (SIGKILL, the OOM killer): torchrun's account of it,
    written as data by cloob.run.torchrun, names it; its 40-line report is not in the log."""
    rec, lines, killed = _Recorder(), [], []

    def on_progress(p: dict) -> None:
        rec.on_progress(p)
        if not killed:
            rank1 = _rank(rec, 1)
            rank1.kill()
            killed.extend([rank1, time.monotonic()])

    result = launch("tiny", _overrides(shards, tmp_path, "train.steps=100000"), nproc_per_node=2, env=env,
                    grace_s=5.0, on_line=lines.append, on_progress=on_progress)
    ended = time.monotonic()
    assert killed and not result.ok and result.failures[1]["signal"] == "SIGKILL", result.failures
    # No restarts allowed: the run ends well within a minute (rank 0 ignores torchrun's SIGTERM only
    # until its next collective fails), not after a process-group timeout.
    assert ended - killed[1] < 60
    with pytest.raises(CloobError) as e:
        result.check()
    assert "rank 1 was killed by SIGKILL" in e.value.problem and "out-of-memory" in e.value.fix
    assert "--max-restarts" in e.value.fix and "\n" not in e.value.problem
    assert not any("ChildFailedError" in line or "Traceback" in line for line in lines), lines
    _assert_run_gone(result.pgid, rec.procs, at_least=5)


def _write_beat(folder: Path, local: int, **beat) -> None:
    (folder / f"beat-{local}").write_text(json.dumps({"rank": local, "pid": os.getpid(), "step_s": None, **beat}))


def test_the_watchdog_names_the_rank_that_holds_up_the_others(tmp_path):
    clock = [0.0]
    dog = Watchdog(tmp_path, 2, limit_s=10, clock=lambda: clock[0])
    sleeper = psutil.Popen(["sleep", "60"])
    try:
        _write_beat(tmp_path, 0, step=5, phase="step", step_s=0.5)
        _write_beat(tmp_path, 1, step=5, phase="step", pid=sleeper.pid)
        assert dog.poll() is None
        sleeper.suspend()
        while sleeper.status() != psutil.STATUS_STOPPED:  # the kernel stops it when it next runs
            time.sleep(0.01)
        clock[0] = 9.0
        assert dog.poll() is None  # within the limit
        clock[0] = 10.5
        stall = dog.poll()
        assert stall.ranks == [1] and stall.step == 5 and stall.states == {1: psutil.STATUS_STOPPED}
        assert stall.describe().startswith("rank 1 has not finished step 6 for 10 s (watchdog limit 10 s")
        # Neither is stopped: the one still waiting for its data holds up the one in a collective.
        sleeper.resume()
        _write_beat(tmp_path, 1, step=5, phase="data", pid=sleeper.pid)
        clock[0] = 30.0
        assert dog.poll().ranks == [1]  # overdue again 10 s after its beat changed
        # Start-up and saves get the floor, whatever the limit.
        assert dog.limit("start") == dog.limit("save") == PHASE_FLOOR_S and dog.limit("step") == 10
    finally:
        _kill_all([sleeper])


def test_the_automatic_limit_follows_the_step_time(tmp_path):
    clock = [0.0]
    dog = Watchdog(tmp_path, 1, limit_s=None, clock=lambda: clock[0])
    assert dog.limit("step") == PHASE_FLOOR_S  # nothing measured yet
    for step in range(1, 4):
        _write_beat(tmp_path, 0, step=step, phase="data", step_s=30.0)
        clock[0] += 1
        dog.poll()
    assert dog.limit("step") == 20 * 30.0 and dog.limit("data") == 600.0
    _write_beat(tmp_path, 0, step=9, phase="data", step_s=0.01)
    dog.poll()
    assert dog.median_step_s() == 30.0  # one fast step does not move the median far
    assert Watchdog(tmp_path, 1, limit_s=None).limit("step") == PHASE_FLOOR_S
    off = Watchdog(tmp_path, 1, limit_s=0, clock=lambda: 1e9)
    assert off.poll() is None and off.limit("start") == float("inf")
    assert STEP_FLOOR_S < PHASE_FLOOR_S


def test_the_root_cause_is_the_first_error_that_is_not_a_peers_reaction():
    errors = [{"rank": 0, "kind": "peer", "problem": "DistBackendError: connection closed", "time": 1.0},
              {"rank": 1, "kind": "cloob", "problem": "no space", "time": 2.0},
              {"rank": 2, "kind": "cloob", "problem": "no space", "time": 3.0}]
    assert reports.root_cause(errors)["rank"] == 1
    assert reports.root_cause(errors[:1])["rank"] == 0 and reports.root_cause([]) is None


def _one_message(stderr: str) -> str:
    """The one `error:` line (with its `  fix:` line right after it) of a failed command's stderr."""
    lines = stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert lines[errors[0] + 1].startswith("  fix: ") and sum("fix:" in line for line in lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[errors[0]]


@pytest.mark.slow
def test_bad_data_under_two_ranks_is_one_message_and_writes_nothing(tmp_path, garbage_shards, env):
    """Three times: 1 run in 3 (fault report A8; 2 in 3 here) also printed a 15-line "Exception ignored in
    atexit callback ... DataLoader worker (pid N) is killed by signal: Terminated" before the error, from
    DataLoader workers still running when the rank's interpreter exited."""
    out = tmp_path / "out"
    # The report's command: the tiny recipe's own batch (64) and data workers (2).
    cmd = [sys.executable, "-m", "cloob.cli", "train", "tiny", f"data.train={garbage_shards}", "data.num_samples=200",
           f"train.output={out}", "train.steps=40", "train.progress=false", "--nproc-per-node=2"]
    for _ in range(3):
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Exception ignored" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr
        assert "no usable training samples" in _one_message(proc.stderr)
        assert not out.exists()  # the first batch is read before the run folder is made


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _file_size_limit(limit: int):
    def preexec():  # inherited by torchrun and the ranks; SIGXFSZ ignored: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return preexec


@pytest.mark.slow
@pytest.mark.parametrize("how", ["full-tmpfs", "file-size-limit"])
def test_a_full_disk_is_one_message(tmp_path, shards, env, how):
    """The first checkpoint (a 13.5 MB model file) does not fit: ENOSPC on a 4 MB tmpfs where we may
    mount one (root), and everywhere EFBIG under a 4 MB file-size limit (ulimit -f)."""
    disk, preexec = tmp_path / "disk", None
    if how == "full-tmpfs":
        if not _mount_tmpfs(disk, "4m"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
    else:
        disk.mkdir()
        preexec = _file_size_limit(4 << 20)
    try:
        proc = subprocess.run(_cli(shards, disk, "train.steps=4", "train.checkpoint_every=2"),
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
                              preexec_fn=preexec)
    finally:
        if how == "full-tmpfs":
            subprocess.run(["umount", "-l", str(disk)], check=False)
    assert proc.returncode == 2, proc.stderr
    line = _one_message(proc.stderr)
    assert ("no space left" if how == "full-tmpfs" else "largest file size") in line, line


@pytest.mark.slow
def test_an_s3_outage_is_one_message(tmp_path, shards, env, monkeypatch):
    """The S3 server goes away after the first checkpoint: one message, exit 2, whether the data
    workers or the checkpoint upload meet it first."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stopped = False
    try:
        host, port = server.get_host_and_port()
        aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_CONFIG_FILE": str(tmp_path / "none"),
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
               "AWS_MAX_ATTEMPTS": "1"}  # botocore's own retries: the outage is for good, say so sooner
        fs = s3fs.S3FileSystem(endpoint_url=aws["AWS_ENDPOINT_URL"], key="testing", secret="testing")
        fs.mkdir("outage")
        fs.put(str(shards) + "/", "outage/shards/", recursive=True)
        cmd = [sys.executable, "-m", "cloob.cli", "train", "tiny", "data.train=s3://outage/shards",
               "train.output=s3://outage/store", "train.run_name=r", "train.batch_size=8", "train.steps=100000",
               "train.checkpoint_every=2", "data.workers=1", "train.progress=false"]
        proc = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, **env, **aws}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 180
            while not fs.exists("outage/store/runs/r/checkpoints/step_00000002/meta.json"):
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "no checkpoint"
                time.sleep(0.5)
            server.stop()
            stopped = True
            _, err = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        if not stopped:
            server.stop()
    assert proc.returncode == 2, err
    assert "lost the storage" in _one_message(err)


@pytest.mark.slow
def test_a_damaged_checkpoint_on_resume_is_one_message(tmp_path, shards, env):
    from cloob.config import load_recipe
    from cloob.train import train

    overrides = _overrides(shards, tmp_path, "train.steps=2", "train.checkpoint_every=2", "data.workers=0",
                           "train.progress=false")
    summary = train(load_recipe("tiny", overrides))
    model = Path(summary["checkpoint"]) / "open_clip_pytorch_model.bin"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    # One rank: an error under two ranks said once is test_bad_data_under_two_ranks_is_one_message...
    proc = subprocess.run([sys.executable, "-m", "cloob.cli", "train", "tiny", *overrides],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "checkpoint" in _one_message(proc.stderr)
