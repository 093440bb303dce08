"""The library's entry point, cloob.losses.LossSpec, takes the path training takes (cloob/losses/plan.py):
the full path while its N x N buffers fit in the memory free now, the blocked rows path when they would
not, with the same value and gradients; and on the blocked path nothing N x N is made.

The memory free is set by replacing cloob.losses.plan.free_memory_bytes (what the trainer's GlobalLoss
reads too); what the loss allocates is seen by a TorchFunctionMode that records the largest tensor any
torch call returns, in the forward and the backward pass."""

from __future__ import annotations

import pytest
import torch
from test_loss_rows import _inputs as rows_inputs
from test_loss_rows import _rel
from torch.overrides import TorchFunctionMode

import cloob.losses.plan as loss_plan
from cloob.losses import METHODS, LossSpec, contrastive_loss


class _LargestTensor(TorchFunctionMode):
    """The most elements of any tensor a torch call returned while the mode was on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _inputs(n: int, d: int, dtype=torch.float32, seed: int = 0):
    return rows_inputs(n, d, dtype, seed)


@pytest.fixture
def free_memory(monkeypatch):
    """Set the memory the plan sees as free (bytes); returns the plans LossSpec made."""
    plans = []
    real = loss_plan.loss_on_plan

    def spy(plan, *args, **kwargs):
        plans.append(plan)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(loss_plan, "loss_on_plan", spy)

    def set_free(nbytes: int) -> list:
        monkeypatch.setattr(loss_plan, "free_memory_bytes", lambda device: nbytes)
        return plans

    return set_free


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_entry_point_blocks_when_the_plan_says_so_with_the_full_paths_result(method, free_memory):
    x, y, t = _inputs(48, 8, torch.float64)
    m = METHODS[method]
    ref = contrastive_loss(x, y, t, objective=m.objective, retrieval=m.retrieval, beta=5.0)
    ref_grads = torch.autograd.grad(ref, (x, y, t))
    plans = free_memory(1024)  # the full path's 7 N^2 float32 (64 KiB) is more than a quarter of it
    loss = LossSpec.from_method(method, beta=5.0)(x, y, t)
    assert plans[-1].block is not None  # the rows path, as training would take it
    assert _rel(loss, ref) <= 1e-12
    for g, r in zip(torch.autograd.grad(loss, (x, y, t)), ref_grads):
        assert _rel(g, r) <= 1e-10


def test_the_entry_point_keeps_the_full_path_while_it_fits(free_memory):
    x, y, t = _inputs(256, 8)
    plans = free_memory(2**40)
    with _LargestTensor() as seen:
        loss = LossSpec()(x, y, t)
        loss.backward()
    assert plans[-1].block is None
    assert seen.numel >= 256 * 256  # the full path's N x N, which the mode does see
    assert torch.equal(loss, contrastive_loss(x, y, t))


def test_at_a_large_batch_the_entry_point_allocates_nothing_n_by_n(free_memory):
    """A batch whose full path (~7 N^2 float32: 112 MiB here) would take more than a quarter of the
    memory free (64 MiB): blocked, no tensor of N x N elements in the forward or backward pass, and the
    full path's value (the gradients of real blocks against the full path: tests/test_loss_rows.py)."""
    n = 2048  # the smallest N where the CPU block (8 MiB of scores) is less than all the rows
    x, y, t = _inputs(n, 4)
    plans = free_memory(64 * 2**20)
    with _LargestTensor() as seen:
        loss = LossSpec()(x, y, t)
        grads = torch.autograd.grad(loss, (x, y, t))
    assert plans[-1].block is not None and plans[-1].block < n
    assert seen.numel < n * n, f"a tensor of {seen.numel} elements, N x N = {n * n}"
    assert all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        assert _rel(loss, contrastive_loss(x, y, t)) <= 1e-5


def test_features_of_the_wrong_shape_get_the_full_paths_error(free_memory):
    free_memory(1)  # would block any batch of the right shape
    with pytest.raises(ValueError, match="must both be"):
        LossSpec()(torch.randn(4096, 4), torch.randn(4095, 4), 30.0)
