"""cloob.run.launch with real torchrun on generated shards: a 2-process run with its log and progress, a
deadline that kills the whole process group and a rerun that resumes, cancellation, and failures.

Runs are few and tiny: most of a launch is importing torch in torchrun and in each rank.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from cloob.data import synthetic
from cloob.errors import CloobError
from cloob.run.launch import _MetricsTail, _resolve_run, _trainer_errors, build_command, launch, still_running
from cloob.train.checkpoint import CheckpointStore

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def env() -> dict:
    """The variables the runs get; the bytecode cache (conftest's bytecode_cache) is warmed first, so
    that deadlines in these tests do not measure the compiler (~13 s before the first step cold,
    ~5 s warm)."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", "import cloob.train, torch.distributed.run, torch.utils.tensorboard"],
                   env={**os.environ, **env}, check=True)
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    synthetic.write_shards(d, 160, shard_size=40, image_size=32, seed=7)  # 4 shards
    return d


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


@pytest.mark.slow
def test_deadline_kills_the_group_and_a_rerun_resumes(tmp_path, shards, env):
    # The deadline must fall after a checkpoint and before the end: here the first step comes ~6 s
    # after the start and the 200 steps take ~10 s more. The rerun has the same overrides (another
    # train.steps is another recipe, which the trainer refuses to resume). A machine too slow to
    # write a checkpoint in time tries again with a longer deadline, one that finishes first with
    # more steps (another recipe hash, so another run folder).
    deadline, steps = 10.0, 200
    env = {**env, "LAUNCH_TEST_SECRET": "s3cr3t-value"}
    for _ in range(3):
        overrides = _overrides(shards, tmp_path, f"train.steps={steps}", "train.checkpoint_every=4")
        rec = _Recorder()
        result = launch("tiny", overrides, deadline_s=deadline, grace_s=5.0, env=env, on_line=rec.on_line,
                        on_progress=rec.on_progress)
        if not result.timed_out:
            steps *= 4
        elif result.checkpoint is None:
            deadline *= 3
        else:
            break
    assert result.timed_out and not result.cancelled and result.returncode != 0
    assert deadline <= result.seconds < deadline + 5.0 + 35.0
    # No process of the run survives: torchrun, the rank and its DataLoader worker.
    _assert_run_gone(result.pgid, rec.procs, at_least=3)
    stopped_at = CheckpointStore(result.run_dir).latest().step
    assert 4 <= stopped_at < steps and stopped_at % 4 == 0
    assert result.last_progress["step"] >= stopped_at
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
    timers = []
    rec = _Recorder()

    def on_line(line: str) -> None:  # cancel 2 s into training, from another thread
        if line.startswith("cloob train:"):
            timers.append(threading.Timer(2.0, stop.set))
            timers[-1].start()

    try:
        result = launch("tiny", _overrides(shards, tmp_path, "train.steps=100000"), nproc_per_node=2,
                        stop=stop, env=env, grace_s=5.0, on_line=on_line, on_progress=rec.on_progress)
    finally:
        for t in timers:
            t.cancel()
    assert timers and stop.is_set()
    assert result.cancelled and not result.timed_out and result.returncode != 0
    assert result.last_progress is not None and 0 < result.last_progress["step"] < 100000
    _assert_run_gone(result.pgid, rec.procs, at_least=5)  # torchrun, both ranks and their DataLoader workers
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
        launch("tiny", _overrides(shards, tmp_path, "train.steps=100000"), nproc_per_node=2, env=env,
               grace_s=5.0, on_progress=ctrl_c)
    assert time.monotonic() - t0 < 120
    assert len(started) == 1 and started[0].returncode is not None
    _assert_run_gone(started[0].pid, rec.procs, at_least=5)


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
def test_trainer_error_is_in_check(tmp_path, shards, env):
    # Valid as a recipe, refused by the trainer: 1000 per rank is more than the 160 samples.
    result = launch("tiny", _overrides(shards, tmp_path / "out", "train.batch_size=1000"), env=env)
    assert result.returncode != 0 and not result.timed_out and not result.cancelled
    assert result.checkpoint is None and result.last_progress is None
    with pytest.raises(CloobError) as e:
        result.check()
    msg = str(e.value)
    assert "fewer than one global batch" in msg and "fix: lower train.batch_size" in msg
    assert "rerun the same command to resume" in msg
    _assert_group_gone(result.pgid)


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


def test_remote_output_is_followed_in_the_local_metrics_mirror(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the trainer mirrors to .cloob-logs/<run name> in its working folder
    run_dir, metrics, total = _resolve_run("tiny", ["train.output=s3://bucket/x/", "train.run_name=r7"])
    assert run_dir == "s3://bucket/x/runs/r7" and total == 300
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


def test_the_trainers_error_is_found_when_two_ranks_print_it_at_once():
    glued = ["W1124 torchrun says", "error: 160 samples are fewer than one global batch (2000)",
             "  fix: lower train.batch_size or add dataerror: 160 samples are fewer than one global batch (2000)",
             "  fix: lower train.batch_size or add data", "ChildFailedError: cloob.train FAILED"]
    assert _trainer_errors(glued) == ["error: 160 samples are fewer than one global batch (2000)",
                                      "  fix: lower train.batch_size or add data"]
