"""Schedules and parameter groups."""

import math

import pytest
import torch

from cloob.config import OptimConfig, ScheduleConfig
from cloob.model import clamp_inv_tau_, create_model
from cloob.train.optim import build_optimizer, lr_factor, param_groups


def test_warmup_is_linear_then_cosine_reaches_zero():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10)
    assert [lr_factor(s, 110, cfg) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(10, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_with_hard_restarts():
    cfg = ScheduleConfig(name="cosine_restarts", warmup_steps=20, restarts=10)
    total = 20 + 1000
    starts = [20 + 100 * k for k in range(10)]
    for s in starts:  # each cycle restarts at the full rate
        assert lr_factor(s, total, cfg) == pytest.approx(1.0)
        assert lr_factor(s + 50, total, cfg) == pytest.approx(0.5)
        assert lr_factor(s + 99, total, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    values = [lr_factor(s, total, cfg) for s in range(20, total)]
    jumps = [i + 20 for i in range(1, len(values)) if values[i] > values[i - 1]]
    assert jumps == starts[1:]  # 10 cycles: 9 hard restarts after the first


def test_constant():
    cfg = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_factor(s, 100, cfg) for s in (0, 3, 4, 99)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_no_weight_decay_on_biases_norms_and_logit_scale():
    model, *_ = create_model("cloob-tiny-vit", learn_inv_tau=True)
    no_decay, decay = param_groups(model, 0.1)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in no_decay_names
    assert all(n.endswith(".bias") or p.ndim < 2 for n, p in model.named_parameters() if n in no_decay_names)
    assert not any(n.endswith(".bias") or "ln_" in n for n in decay_names)
    assert any("ln_" in n for n in no_decay_names)
    assert len(no_decay_names) + len(decay_names) == sum(1 for _ in model.parameters())
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_fixed_inv_tau_is_frozen_and_learnable_is_clamped():
    model, *_ = create_model("cloob-tiny-vit", inv_tau=30.0, learn_inv_tau=False)
    assert not model.logit_scale.requires_grad
    assert model.logit_scale.exp().item() == pytest.approx(30.0)
    model, *_ = create_model("cloob-tiny-vit", inv_tau=30.0, learn_inv_tau=True)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > 100
    clamp_inv_tau_(model)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    clamp_inv_tau_(model)
    assert model.logit_scale.exp().item() == pytest.approx(1.0)


def test_real_architectures_build_offline():
    model, _, val_tf, tok = create_model("RN50", inv_tau=30.0)
    assert model.logit_scale.exp().item() == pytest.approx(30.0)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    assert tok(["a photo"]).shape == (1, 77)


def test_the_optimizer_steps_as_the_plain_adamw_loop_does():
    """build_optimizer's fused AdamW follows torch's per-parameter loop to float32 precision (weight
    decay groups, bias correction and all), and is fused."""
    final = []
    for fused in (True, False):
        torch.manual_seed(0)
        model, _, _, _ = create_model("cloob-tiny-vit", 30.0, True)
        cfg = OptimConfig(lr=1e-3, weight_decay=0.1)
        opt = build_optimizer(model, cfg) if fused else \
            torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                              foreach=False)
        assert bool(opt.defaults["fused"]) is fused
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        final.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*final):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    start = create_model("cloob-tiny-vit", 30.0, True)[0]
    moved = [(a - b).abs().max().item() for a, b in zip(final[0], start.parameters())]
    assert sum(m > 1e-4 for m in moved) > 50  # the steps moved them far more than the tolerance
