"""Mixed precision, gradient checkpointing and torch.compile through the real trainer (CPU)."""

import json
from pathlib import Path

import pytest

from cloob.config import load_recipe
from cloob.train import train


@pytest.fixture(scope="module")
def tiny_shards(make_shards):
    return make_shards(64, 32, seed=5)


def _run(tiny_shards, out, *overrides):
    recipe = load_recipe("tiny", [f"data.train={tiny_shards}", f"train.output={out}", "train.steps=3",
                                  "train.batch_size=16", "data.workers=0", "train.log_every=1",
                                  "train.progress=false", "model.inv_tau=100", *overrides])
    summary = train(recipe)
    return [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["cloob", "clip"])
def test_amp_training_is_finite(tmp_path, tiny_shards, precision, method):
    metrics = _run(tiny_shards, tmp_path, f"train.precision={precision}", f"loss.method={method}",
                   "model.learn_inv_tau=true")
    assert len(metrics) == 3
    assert all(m["loss"] == m["loss"] and abs(m["loss"]) < 10 for m in metrics)  # finite, not NaN
    assert all(1.0 - 1e-4 <= m["inv_tau"] <= 100.0 + 1e-4 for m in metrics)  # float32 exp(log(100))


def test_gradient_checkpointing_gives_the_same_run(tmp_path, tiny_shards):
    plain = _run(tiny_shards, tmp_path / "a")
    ckpt = _run(tiny_shards, tmp_path / "b", "model.grad_checkpointing=true")
    assert [m["loss"] for m in plain] == pytest.approx([m["loss"] for m in ckpt], rel=1e-5)


@pytest.mark.slow
def test_torch_compile_runs(tmp_path, tiny_shards):
    plain = _run(tiny_shards, tmp_path / "a", "train.steps=2")
    compiled = _run(tiny_shards, tmp_path / "b", "train.steps=2", "model.compile=true")
    assert [m["loss"] for m in plain] == pytest.approx([m["loss"] for m in compiled], rel=1e-3)
