"""DDP with two real gloo processes under torchrun: the loss over the gathered global batch equals one
process's loss on the concatenated batch, and every parameter's gradient equals the single-process
full-batch gradient divided by world_size (the documented convention, logit_scale included).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloob.losses import METHODS, LossSpec
from cloob.train import distributed

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

WORLD = 2


def _torchrun(args, tmp_path, nproc=WORLD, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One torchrun launch computes every method on 2 ranks (launches cost ~20 s each)."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun([str(Path(ddp_worker.__file__)), str(out), *sorted(METHODS)], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {m: [torch.load(out / f"{m}-rank{r}.pt") for r in range(WORLD)] for m in METHODS}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_gloo_ranks_match_one_process(ddp_results, method):
    ranks = ddp_results[method]

    model, tokenizer = ddp_worker.build()
    images, texts = ddp_worker.global_batch(tokenizer)
    image_features, text_features, inv_tau = model(images, texts)
    loss = LossSpec.from_method(method)(image_features, text_features, inv_tau)
    loss.backward()

    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    assert "logit_scale" in names and set(ranks[0]["grads"]) == set(names)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        # DDP leaves the same averaged gradient on every rank: full-batch gradient / world_size.
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["grads"][name] * WORLD, p.grad, rtol=1e-8, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


def test_gather_is_identity_in_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    info = distributed.DistInfo()
    out, _, t = distributed.loss_inputs(x, x, torch.tensor(2.0, requires_grad=True), info)
    assert out is x and t.item() == 2.0


def test_scale_grad_is_exact_forward_and_scaled_backward():
    t = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
    y = distributed.scale_grad(t, 0.25)
    assert torch.equal(y, t)
    (y * 5).backward()
    assert t.grad.item() == pytest.approx(1.25)


@pytest.mark.slow
def test_torchrun_training_run_on_two_ranks(tmp_path, shards_dir):
    proc = _torchrun(["-m", "cloob.train", "tiny", f"data.train={shards_dir}", f"train.output={tmp_path}",
                      "train.steps=4", "train.batch_size=8", "data.workers=1", "train.log_every=1",
                      "train.progress=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    meta = (runs[0] / "checkpoints" / "step_00000004" / "meta.json").read_text()
    assert '"world_size": 2' in meta
    lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
