"""Faults of long runs, with real torchrun, gloo ranks and signals: SIGTERM (to `cloob train`, to
torchrun) stops every rank after the same step with a checkpoint of it, a rank killed outright is
restarted with its group, and the run still ends bit-exact with an uninterrupted one; a step with a
non-finite loss is skipped and counted, and too many of them stop the run with one message.

One uninterrupted reference run per module; the faults are chained on one run folder, so that the
whole file starts torchrun five times (two of them in one launch).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import child_env, rank_number

from cloob.config import load_recipe
from cloob.errors import CloobError
from cloob.run.launch import _resolve_run, launch, still_running
from cloob.train import loop, train
from cloob.train.checkpoint import STATE_FILE, CheckpointStore
from cloob.train.nonfinite import NonfiniteSteps, flag

STEPS, EVERY = 30, 10
PREEMPTED = re.compile(r"cloob train: preempted by SIGTERM at step (\d+); checkpoint step_(\d{8}) written; "
                       r"rerun the same command to resume")


@pytest.fixture(scope="module")
def env() -> dict:
    return child_env({}, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def shards(make_shards):
    return make_shards(160, 40, seed=7)  # 4 shards, 10 steps per epoch


def _overrides(shards, out, *extra):
    return [f"data.train={shards}", f"train.output={out}", "train.batch_size=8", "train.log_every=1",
            "data.workers=1", "data.shuffle_buffer=40", "schedule.warmup_steps=2", f"train.steps={STEPS}",
            f"train.checkpoint_every={EVERY}", "train.run_name=r", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards, env):
    """An uninterrupted 2-rank run: (final model state, logged losses). Started with bare torchrun, as
    the trainer's docstring shows (`torchrun --nproc_per_node N -m cloob.train ...`), not through
    cloob's launcher: that way of starting is checked here too (a run, a checkpoint, its world size)."""
    out = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cloob.train",
           "tiny", *_overrides(shards, out), "train.progress=false"]
    proc = subprocess.run(cmd, env={**os.environ, **env}, cwd=out, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = out / "runs" / "r"
    assert CheckpointStore(str(run_dir)).latest().meta()["world_size"] == 2
    return _final(run_dir)


def _final(run_dir) -> tuple[dict, list]:
    model, _, meta = CheckpointStore.load(CheckpointStore(str(run_dir)).latest())
    assert meta["step"] == STEPS
    losses = [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return model, losses


def _torchrun_tree() -> list[psutil.Process]:
    """This process's torchrun and everything under it (ranks, DataLoader workers)."""
    for c in psutil.Process().children():
        try:
            if "cloob.run.torchrun" in c.cmdline():
                return [c, *c.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return []


def _rank(tree, rank: int) -> psutil.Process:
    return next(p for p in tree[1:] if p.ppid() == tree[0].pid and rank_number(p) == rank)


def _gone(procs, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while (alive := still_running(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, [(p.pid, p.cmdline()[:5]) for p in alive]


def _latest(run_dir) -> int:
    return CheckpointStore(str(run_dir)).latest().step


def _reasons(run_dir) -> dict[int, str | None]:
    """{step: why its checkpoint was written (meta.json's reason)} of the run's checkpoints."""
    return {ref.step: ref.meta().get("reason") for ref in CheckpointStore(str(run_dir)).complete()}


@pytest.mark.slow
def test_preempted_and_restarted_runs_end_bit_exact(tmp_path, shards, env, reference):
    """One run folder, three launches, each stopped a different way, then compared with the reference:
    1. SIGTERM to the `cloob train` process: 143, the preempted line, a checkpoint of that very step;
    2. SIGTERM to torchrun (a batch system, a node going away): the same, as the launcher reports it;
    3. SIGKILL of rank 0 (the one holding the run-folder lock) with one restart allowed: torchrun
       restarts the group, the new rank 0 takes the dead one's lock, and the run finishes.
    """
    overrides = _overrides(shards, tmp_path)
    run_dir = Path(_resolve_run("tiny", overrides)[0])
    metrics = run_dir / "metrics.jsonl"

    # 1. `cloob train` gets SIGTERM (what tini passes on in a pod) after step 3.
    cli = psutil.Popen([sys.executable, "-m", "cloob.cli", "train", "tiny", *overrides, "train.progress=false",
                        "--nproc-per-node=2"], env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert cli.poll() is None and time.monotonic() < deadline, cli.communicate()[1][-3000:]
            time.sleep(0.05)
        tree = cli.children(recursive=True)
        t0 = time.monotonic()
        cli.send_signal(signal.SIGTERM)
        _, err = cli.communicate(timeout=120)
        took = time.monotonic() - t0
        _gone(tree)
    finally:
        for p in [cli, *tree]:
            try:
                p.kill()
            except psutil.Error:
                pass
    assert cli.returncode == 143, err[-3000:]
    m = PREEMPTED.fullmatch(err.splitlines()[-1])
    assert m and int(m.group(1)) == int(m.group(2)), err[-3000:]
    first = int(m.group(1))
    assert 3 <= first < STEPS and _latest(run_dir) == first  # a checkpoint of the step it stopped after
    assert _reasons(run_dir)[first] == "stopped", _reasons(run_dir)  # and it says why it was written
    assert "Traceback" not in err and took < 60, (took, err[-3000:])
    print(f"SIGTERM to cloob train -> exit: {took:.1f} s")

    # 2. SIGTERM to torchrun itself, 3 steps after the resume.
    lines, seen = [], []

    def sigterm_torchrun(p: dict) -> None:
        if p["step"] >= first + 3 and not seen:
            seen.extend(_torchrun_tree())
            seen[0].send_signal(signal.SIGTERM)
            seen.append(time.monotonic())

    result = launch("tiny", overrides, nproc_per_node=2, env=env, on_line=lines.append, on_progress=sigterm_torchrun)
    took = time.monotonic() - seen.pop()
    _gone(seen)
    assert any(f"resuming from step {first}" in line for line in lines), lines
    assert result.returncode == 143 and not result.cancelled and result.preempted, (result, lines)
    second = result.preempted["step"]
    assert first + 3 <= second < STEPS and _latest(run_dir) == second and _reasons(run_dir)[second] == "stopped"
    with pytest.raises(CloobError, match=f"preempted by SIGTERM at step {second}; checkpoint step_{second:08d} "
                                         "written") as e:
        result.check()
    assert "resume" in e.value.fix
    assert not any("Traceback" in line or "SignalException" in line for line in lines), lines
    print(f"SIGTERM to torchrun -> launch returns: {took:.1f} s")

    # 3. Rank 0 killed outright (the OOM killer) after the next checkpoint; one restart allowed.
    lines, killed = [], []

    def kill_rank0(p: dict) -> None:
        if p["step"] >= second + 3 and not killed:
            _rank(_torchrun_tree(), 0).kill()
            killed.append(time.monotonic())

    result = launch("tiny", overrides, nproc_per_node=2, env=env, on_line=lines.append, on_progress=kill_rank0,
                    max_restarts=1)
    assert result.ok, "\n".join(result.log_tail)
    assert "--max_restarts" in result.command and len(result.restarts) == 1
    restart = [line for line in lines if "restarting the group" in line]
    assert restart and re.fullmatch(r"cloob train: rank 0 died \(SIGKILL\); restarting the group \(restart 1 of 1\), "
                                    r"resuming from step_\d{8}", restart[0]), lines
    assert any("took over the lock" in line and "its process has ended" in line for line in lines), lines
    resumed = int(restart[0][-8:])
    assert any(f"resuming from step {resumed}" in line for line in lines), lines

    reasons = _reasons(run_dir)  # the regular ones, the two stops (where still kept) and the last step's
    assert reasons.pop(STEPS) == "final" and reasons, reasons
    assert all(r == ("stopped" if s in (first, second) else "scheduled") for s, r in reasons.items()), reasons
    model, losses = _final(run_dir)
    ref_model, ref_losses = reference
    for k in ref_model:
        assert torch.equal(model[k], ref_model[k]), k
    assert len(losses) == STEPS and losses == ref_losses


# ------------------------------------------------------------------------ non-finite steps

def _nan_at(monkeypatch, calls: set[int] | None = None, after: int | None = None) -> list:
    """The model's image features become NaN on these forward calls (1-based) of this process: a
    test-side stand-in for a loss that blows up, with no hook in the trainer. Returns, per call, the
    weights and optimizer moments it found (those after the step before)."""
    make, optimizer, seen = loop.create_model, [], []

    def build_optimizer(*args, **kwargs):
        optimizer.append(loop_build(*args, **kwargs))
        return optimizer[-1]

    def create_model(*args, **kwargs):
        model, *rest = make(*args, **kwargs)
        forward, count = model.forward, [0]

        def poisoned(images, texts):
            count[0] += 1
            moments = [t.clone() for s in optimizer[-1].state.values() for t in s.values() if torch.is_tensor(t)]
            seen.append(([t.detach().clone() for t in model.state_dict().values()], moments))
            image, text, inv_tau = forward(images, texts)
            if (calls and count[0] in calls) or (after and count[0] >= after):
                image = image * float("nan")
            return image, text, inv_tau

        model.forward = poisoned
        return (model, *rest)

    loop_build = loop.build_optimizer
    monkeypatch.setattr(loop, "create_model", create_model)
    monkeypatch.setattr(loop, "build_optimizer", build_optimizer)
    return seen


def _recipe(shards, out, *extra):
    return load_recipe("tiny", [f"data.train={shards}", f"train.output={out}", "train.batch_size=8", "train.steps=6",
                                "train.log_every=1", "data.workers=0", "train.checkpoint_every=3",
                                "train.progress=false", "schedule.warmup_steps=2", "train.run_name=n", *extra])


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True))


def test_a_nonfinite_step_is_skipped_counted_and_a_resume_goes_on_counting(tmp_path, shards, monkeypatch):
    seen = _nan_at(monkeypatch, calls={3, 5})
    run_dir = Path(train(_recipe(shards, tmp_path))["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [r["step"] for r in rows if r["loss"] != r["loss"]] == [3, 5]  # NaN, logged as it was
    # seen[k]: what step k + 1 started from. Steps 3 and 5 changed neither weights nor moments.
    assert _same(seen[2], seen[3]) and _same(seen[4], seen[5])
    assert not _same(seen[1], seen[2]) and not _same(seen[3], seen[4])
    store = CheckpointStore(str(run_dir))
    _, state, _ = CheckpointStore.load(store.latest())
    assert state["step"] == 6 and state["nonfinite_skipped"] == 2
    assert state["optimizer"]["state"][0]["step"] == 4  # the optimizer's own count: 6 steps less 2 skipped

    # Resume from step 3 (one skipped so far); the rerun's second forward call is step 5.
    (Path(store.latest().url) / "meta.json").unlink()
    monkeypatch.undo()
    _nan_at(monkeypatch, calls={2})
    train(_recipe(shards, tmp_path))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert torch.load(Path(store.latest().url) / STATE_FILE, weights_only=False)["nonfinite_skipped"] == 2


def test_too_many_nonfinite_steps_stop_the_run_with_one_error(tmp_path, shards, monkeypatch):
    _nan_at(monkeypatch, after=3)
    with pytest.raises(CloobError) as e:
        train(_recipe(shards, tmp_path, "train.max_nonfinite_steps=2", "train.checkpoint_every=2"))
    last_good = CheckpointStore(str(tmp_path / "runs" / "n")).latest()
    assert last_good.step == 4
    assert e.value.problem == (f"the loss or its gradient was not finite at step 5: 3 such steps skipped, more than "
                               f"train.max_nonfinite_steps=2; the last good checkpoint is {last_good.url}")
    assert all(x in e.value.fix for x in ("optim.lr", "optim.grad_clip", "bf16", "fp32"))


def test_fp16_scaler_overflow_is_not_counted_unless_it_persists_at_scale_one():
    """An overflow of the scaled gradients is the GradScaler's own business (it skips and halves its
    scale); a NaN loss, or gradients still infinite at a scale <= 1, count."""
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(finite)  # the scale tensor is made on first use
    assert flag(finite, [p], scaler).item() == 0.0 and flag(nan, [p], scaler).item() == 1.0
    scaler.update(new_scale=1.0)
    assert flag(finite, [p], scaler).item() == 1.0
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert flag(finite, [p], off).item() == 1.0
    p.grad = torch.zeros(3)
    assert flag(finite, [p], off).item() == 0.0

    # A skipped step leaves the scaler as it was and ready for the next unscale_.
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(finite)
    scaler.unscale_(opt)
    NonfiniteSteps(limit=1).skip(1, scaler, None)
    assert scaler.get_scale() == 8.0
    scaler.unscale_(opt)  # would raise "unscale_() has already been called" without the reset
    with pytest.raises(CloobError, match="no checkpoint was written yet"):
        NonfiniteSteps(limit=0).skip(1, torch.amp.GradScaler("cpu", enabled=False), None)


# ------------------------------------------------------------------------ what the launcher reads

def test_the_reports_of_a_restarted_group_tell_its_latest_attempt(tmp_path, monkeypatch):
    """Records of a group that torchrun restarted stay in the report folder; only the latest
    attempt's say how the run ended. A restart is told as one line."""
    from cloob.run import reports
    from cloob.run.launch import LaunchResult, restart_line

    monkeypatch.setenv(reports.ENV, str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("RANK", "1")
    reports.write_error("internal", "boom", traceback="Traceback ...")
    monkeypatch.setenv("RANK", "0")
    reports.write_preempted(signal.SIGTERM, 7, "/r/checkpoints/step_00000007")
    died = {1: {"signal": "SIGKILL", "exitcode": -9, "time": 1}, 0: {"signal": None, "exitcode": 1, "time": 2}}
    reports.write_restart(1, 2, died)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    reports.write_error("peer", "RuntimeError: Connection reset by peer")

    (restart,) = reports.read_restarts(tmp_path)
    assert restart_line(restart, "/r/checkpoints/step_00000020") == (
        "cloob train: rank 1 died (SIGKILL); restarting the group (restart 1 of 2), resuming from step_00000020")
    errors = reports.read_errors(tmp_path)
    assert reports.root_cause(errors, attempt=0)["problem"] == "boom"
    assert reports.root_cause(errors, attempt=1)["kind"] == "peer"  # attempt 0's error was restarted away
    assert reports.read_preempted(tmp_path, 0)["step"] == 7 and reports.read_preempted(tmp_path, 1) is None

    ended = LaunchResult(returncode=1, run_dir="/r", checkpoint="/r/checkpoints/step_00000020", last_progress=None,
                         seconds=9.0, timed_out=False, cancelled=False, log_tail=[], command=[], pgid=1,
                         failures=died, restarts=[restart, restart], max_restarts=2)
    with pytest.raises(CloobError, match=r"rank 1 was killed by SIGKILL .*after 2 restart\(s\) of the group"):
        ended.check()


def test_sigterm_is_only_recorded_while_the_loop_runs():
    """Outside the loop (start-up, the end) SIGTERM does what it did before; inside, it is recorded
    for the step boundary; afterwards the previous handler is back."""
    from cloob.train import preemption

    got = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        with preemption.stop_at_step_boundary():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == [signal.SIGTERM] and preemption.requested() == 0
            preemption.running()
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == [signal.SIGTERM] and preemption.requested() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        assert got == [signal.SIGTERM] * 2
    finally:
        signal.signal(signal.SIGTERM, before)


_EARLY_SIGTERM = """
import os, signal, sys
from cloob.lock import folder_lock
from cloob.train import preemption
with folder_lock(sys.argv[1], purpose="cloob train test"), preemption.stop_at_step_boundary():
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # torchrun stopping this rank: its peer failed on bad data
    sys.stdin.read()  # the first batch, never got
"""


def test_sigterm_before_the_loop_ends_the_rank_with_its_lock_released(tmp_path):
    """A rank stopped before its loop runs (its first batch not read yet) ends at once, as before, but
    leaves the blocks it is in: the run folder's lock is released and the folder the lock made is
    gone. Killed outright, it left `runs/<name>/lock.json` behind (seen as test_launch's bad-data test
    failing 1 run in 3 once ranks started together, forked)."""
    run_dir = tmp_path / "out" / "runs" / "r"
    proc = subprocess.run([sys.executable, "-c", _EARLY_SIGTERM, str(run_dir)], capture_output=True, text=True,
                          timeout=120, env=child_env(), stdin=subprocess.PIPE)
    assert proc.stdout.split() == ["locked"], proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists(), sorted(str(p) for p in tmp_path.rglob("*"))
