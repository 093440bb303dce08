"""AdamW with the usual no-decay groups, and step-based learning-rate schedules with linear warmup.

Schedules are pure functions of the step (no state to save): lr(step) = base_lr * factor(step).
- cosine: after warmup, 0.5 (1 + cos(pi p)) with p the fraction of post-warmup steps done.
- cosine_restarts: after warmup, N hard restarts: 0.5 (1 + cos(pi ((N p) mod 1))), the reference
  run's `cosine-restarts` with restart_cycles = N (transformers' cosine_with_hard_restarts).
- constant: 1 after warmup.
Warmup is linear: (step + 1) / warmup_steps.
"""

from __future__ import annotations

import math

import torch

from cloob.config import OptimConfig, ScheduleConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices: no decay on biases, norm weights, embeddings' scalars, logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "logit_scale" in name or name.endswith(".bias") or ".ln" in name or ".bn" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # fused: one kernel per parameter, on CPU and GPU. torch's default on CPU is a per-parameter loop,
    # and its multi-tensor version makes full-size temporaries (sqrt, division) of every parameter:
    # with the text tower's 49408 x 64 token embedding that was half of a tiny-model step (101 ms
    # foreach, 52 ms fused, one thread, batch 64). It rounds differently from the loop, within float32
    # precision (tests/test_optim.py).
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=True)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cycles = cfg.restarts if cfg.name == "cosine_restarts" else 1
    phase = (cycles * progress) % 1.0 if progress < 1.0 else 1.0
    return 0.5 * (1.0 + math.cos(math.pi * phase))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
