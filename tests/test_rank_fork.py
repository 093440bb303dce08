"""Ranks forked from torchrun's agent (cloob.run.rank_fork): they train exactly as ranks started as new
interpreters (CLOOB_RANK_START=exec), look like them to ps and to the launcher's process tree, and
the agent's preload touches no GPU driver (a forked child could not use one initialized there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import child_env

from cloob.errors import CloobError
from cloob.run import rank_fork
from cloob.train.checkpoint import CheckpointStore

ROOT = Path(__file__).parents[1]


def test_only_torchruns_command_for_cloob_train_is_forked():
    assert rank_fork.rank_args([sys.executable, "-u", "-m", "cloob.train", "tiny", "a=1"]) == ["tiny", "a=1"]
    assert rank_fork.rank_args([sys.executable, "-u", "-m", "cloob.train"]) == []
    assert rank_fork.rank_args([sys.executable, "-u", "-m", "other.module", "tiny"]) is None
    assert rank_fork.rank_args([sys.executable, "-u", "train.py", "tiny"]) is None
    assert rank_fork.rank_args(["numactl", "--cpunodebind=0", sys.executable, "-u", "-m", "cloob.train"]) is None
    assert rank_fork.rank_args(["/usr/bin/python3-other", "-u", "-m", "cloob.train"]) is None


def test_the_escape_hatch_and_a_bad_value(monkeypatch):
    from cloob.run.launch import launch

    assert rank_fork.wanted({}) and rank_fork.wanted({"CLOOB_RANK_START": "fork"})
    assert not rank_fork.wanted({"CLOOB_RANK_START": "exec"})
    with pytest.raises(CloobError) as e:
        rank_fork.wanted({"CLOOB_RANK_START": "spawn"})
    assert "CLOOB_RANK_START='spawn'" in e.value.problem and "fork" in e.value.fix and "exec" in e.value.fix
    monkeypatch.setenv("CLOOB_RANK_START", "forkk")
    with pytest.raises(CloobError, match="CLOOB_RANK_START"):  # from the launcher, before torchrun starts
        launch("tiny", ["train.steps=1"])


def test_an_open_gpu_driver_means_no_fork(tmp_path):
    fds = tmp_path / "fd"
    fds.mkdir()
    (fds / "0").symlink_to("/dev/null")
    (fds / "5").symlink_to("pipe:[123]")
    assert not rank_fork.gpu_driver_open(str(fds))
    (fds / "9").symlink_to("/dev/nvidiactl")
    assert rank_fork.gpu_driver_open(str(fds))
    assert rank_fork.gpu_driver_open(str(tmp_path / "missing"))  # cannot tell: no fork
    assert not rank_fork.gpu_driver_open()  # this process (no GPU here, or none opened by the tests)


_PRELOAD = """
import sys, torch, torch.cuda
calls = []
def record(name, real):
    def f(*a, **k):
        calls.append(name)
        return real(*a, **k)
    return f
for name in ("is_available", "device_count", "_lazy_init", "init", "current_device"):
    setattr(torch.cuda, name, record(name, getattr(torch.cuda, name)))
torch._C._cuda_getDeviceCount = record("_cuda_getDeviceCount", torch._C._cuda_getDeviceCount)
from cloob.run import rank_fork
rank_fork.preload(sys.argv[1:])
import cloob.train.loop, open_clip
print(sorted(set(calls)), "timm" in sys.modules and sys.modules["timm"] is not None)
"""


@pytest.mark.parametrize(("arch", "timm"), [("cloob-tiny-vit", False), ("convnext_base", True)])
def test_the_agents_preload_asks_nothing_of_cuda(arch, timm):
    """What the agent imports before it forks ranks does not ask CUDA anything (even whether it is
    there: cudaGetDeviceCount initializes the driver, and a fork after that cannot use the GPU)."""
    proc = subprocess.run([sys.executable, "-c", _PRELOAD, "tiny", f"model.arch={arch}"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", str(timm)], proc.stdout


@pytest.fixture(scope="module")
def shards(make_shards):
    return make_shards(96, 24, seed=11)  # 4 shards


def _train(shards, out, env, ranks: int = 2, *extra) -> tuple[list[dict], dict, list]:
    """A run of 6 steps; the ranks as seen at its progress lines, its losses and final model."""
    from cloob.run.launch import launch

    seen: dict[int, dict] = {}

    def look(_progress):
        for agent in psutil.Process().children():
            try:
                if "cloob.run.torchrun" not in agent.cmdline():
                    continue
                for rank in agent.children():
                    seen.setdefault(rank.pid, {"name": rank.name(), "cmdline": rank.cmdline(),
                                               "session": os.getsid(rank.pid), "parent": agent.pid})
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass

    overrides = [f"data.train={shards}", f"train.output={out}", "train.batch_size=8", "train.log_every=1",
                 "train.steps=6", "data.workers=1", "data.shuffle_buffer=24", "schedule.warmup_steps=2", *extra]
    result = launch("tiny", overrides, nproc_per_node=ranks, env=env, on_progress=look)
    assert result.returncode == 0, "\n".join(result.log_tail)
    model, _, meta = CheckpointStore.load(CheckpointStore(result.run_dir).latest())
    assert meta["step"] == 6
    losses = [json.loads(line)["loss"] for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return list(seen.items()), model, losses


@pytest.mark.slow
def test_forked_ranks_train_as_new_interpreters_do_and_look_like_them(tmp_path, shards):
    env = child_env({}, OMP_NUM_THREADS="1")
    forked, model, losses = _train(shards, tmp_path / "fork", env)
    execd, model_x, losses_x = _train(shards, tmp_path / "exec", {**env, "CLOOB_RANK_START": "exec"})

    assert losses == losses_x and len(losses) == 6
    assert model.keys() == model_x.keys() and all(torch.equal(model[k], model_x[k]) for k in model)

    assert len(forked) == 2 and len(execd) == 2, (forked, execd)
    for pid, rank in forked + execd:
        assert rank["cmdline"][:4] == [sys.executable, "-u", "-m", "cloob.train"], rank["cmdline"]
        assert "tiny" in rank["cmdline"] and "train.steps=6" in rank["cmdline"]
        assert rank["session"] == pid  # a session of its own, as torch's Popen gives it
    assert sorted(r["name"] for _, r in forked) == ["cloob-rank0", "cloob-rank1"]
    assert not any(r["name"].startswith("cloob-rank") for _, r in execd)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_forked_rank_trains_on_the_gpu(tmp_path, shards):
    """The agent imports the trainer without asking CUDA anything; the rank forked from it initializes
    CUDA itself and trains (bench/gpu_check runs this with the other CUDA-marked tests)."""
    forked, _, losses = _train(shards, tmp_path, child_env({}), 1, "train.device=cuda")
    assert [r["name"] for _, r in forked] == ["cloob-rank0"] and len(losses) == 6
