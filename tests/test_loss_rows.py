"""The row-wise loss (cloob/losses/rows.py) against the full path (cloob/losses/full.py, itself tested
against a transcription of its formulas in tests/test_losses.py): the same value and gradients for
every method, whole or in blocks, and summed over a partition of the rows, as the ranks of the sharded
loss compute it (here in one process, with a gather that concatenates the parts); and the choice of
path (cloob/losses/plan.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cloob.config import LossConfig
from cloob.losses import METHODS, contrastive_loss, rows_loss
from cloob.losses.plan import AUTO_MEMORY_FRACTION, plan_loss
from cloob.losses.rows import _LogSumExpRows, _RetrieveRows, retrieve_rows
from cloob.train.distributed import DistInfo
from cloob.train.global_loss import GlobalLoss

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _inputs(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    t = torch.tensor(30.0, dtype=dtype, requires_grad=True)
    return x, y, t


def _rel(a, b) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


def _reference(x, y, t, method):
    objective, retrieval = METHODS[method].objective, METHODS[method].retrieval
    loss = contrastive_loss(x, y, t, objective=objective, retrieval=retrieval, beta=8.0)
    return loss, torch.autograd.grad(loss, (x, y, t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("block", [None, 1, 7, 16, 40])
def test_rows_equal_the_full_path(method, block, dtype):
    x, y, t = _inputs(40, 12, dtype)
    ref, ref_grads = _reference(x, y, t, method)
    objective, retrieval = METHODS[method].objective, METHODS[method].retrieval
    loss = rows_loss(x, y, t, objective=objective, retrieval=retrieval, beta=8.0, block=block)
    grads = torch.autograd.grad(loss, (x, y, t))
    assert _rel(loss, ref) <= TOL[dtype]
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) <= TOL[dtype]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("parts, block", [(2, None), (3, None), (4, 3)])
def test_a_partition_of_the_rows_sums_to_the_loss(method, parts, block):
    """What the ranks of the sharded loss compute, each its own rows: the parts' losses sum to the loss,
    and their gradients, summed over parts through the gather, to its gradients."""
    x, y, t = _inputs(36, 10, torch.float64, seed=1)
    ref, ref_grads = _reference(x, y, t, method)
    objective, retrieval = METHODS[method].objective, METHODS[method].retrieval
    per = 36 // parts
    xs, ys = x.split(per), y.split(per)

    total = sum(_part_loss(xs, ys, t, r, objective, retrieval, block, per) for r in range(parts))
    grads = torch.autograd.grad(total, (x, y, t))
    assert _rel(total, ref) <= 1e-12
    for g, r_ in zip(grads, ref_grads):
        assert _rel(g, r_) <= 1e-10


def _part_loss(xs, ys, t, r, objective, retrieval, block, per):
    """rows_loss of part r, with a gather that returns every part's rows of what is gathered, in the
    order rows_loss gathers: the features x and y, then (with retrieval) the candidates U_y and V_x,
    which the other parts retrieve from the whole memories. Part r's own rows are the tensor given."""
    big_x, big_y = torch.cat(xs), torch.cat(ys)
    gathered = [xs, ys]
    if retrieval == "hopfield":
        gathered += [[retrieve_rows(q, big_x, 8.0, block) for q in ys], [retrieve_rows(q, big_y, 8.0, block) for q in xs]]
    order = iter(gathered)

    def gather(local):
        parts = next(order)
        assert torch.equal(local, parts[r]), "rows_loss gathered something else, or in another order"
        return torch.cat([local if i == r else p for i, p in enumerate(parts)])

    loss = rows_loss(xs[r], ys[r], t, objective=objective, retrieval=retrieval, beta=8.0, n_global=per * len(xs),
                     offset=r * per, gather=gather, block=block)
    assert next(order, None) is None  # everything rows_loss needed was gathered
    return loss


@pytest.mark.parametrize("block", [None, 3])
def test_gradcheck_of_the_row_functions(block):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, m: _RetrieveRows.apply(q, m, 2.0, block or 7), (q, m))
    assert torch.autograd.gradcheck(lambda q, m: _LogSumExpRows.apply(q, m, 2, True, block or 7), (q, m))
    assert torch.autograd.gradcheck(lambda q, m: _LogSumExpRows.apply(q, m, 0, False, block or 7), (q, m))


def test_blocked_float32_under_autocast_is_computed_in_float32():
    x, y, t = _inputs(32, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rows_loss(x.bfloat16(), y.bfloat16(), t, objective="infoloob", retrieval="hopfield", beta=8.0, block=5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_the_planner_blocks_when_the_buffers_would_not_fit():
    n = 16384  # full path: ~7 N^2 float32 = 7 GiB
    assert plan_loss(n, 1, free_bytes=64 * 2**30).block is None
    small = plan_loss(n, 1, free_bytes=8 * 2**30)
    assert small.block and small.buffer_bytes <= AUTO_MEMORY_FRACTION * 8 * 2**30
    assert small.block & (small.block - 1) == 0  # a power of two
    # Sharded over 8 ranks each holds 8 B x N: 1 GiB; that fits where the replicated 7 GiB would not.
    sharded = plan_loss(n, 8, free_bytes=8 * 2**30)
    assert sharded.sharded and sharded.rows == n // 8 and sharded.block is None
    replicated = plan_loss(n, 8, distributed="replicated", free_bytes=8 * 2**30)
    assert not replicated.sharded and replicated.block
    # Fields win over the estimate; with one rank there is nothing to shard.
    assert plan_loss(n, 1, blocked=True, block_rows=100, free_bytes=1 << 50).block == 100
    assert plan_loss(n, 1, blocked=False, free_bytes=1).block is None
    assert not plan_loss(n, 1).sharded and plan_loss(64, 2).rows == 32
    assert "blocked (1024 rows" in plan_loss(n, 1, blocked=True, block_rows=1024).describe(1)


@pytest.mark.parametrize("blocked", [False, True])
def test_global_loss_in_one_process_is_the_loss(blocked):
    x, y, t = _inputs(24, 8, torch.float64)
    ref, ref_grads = _reference(x, y, t, "cloob")
    fn = GlobalLoss(LossConfig(method="cloob", beta=8.0, blocked=blocked, block_rows=5), DistInfo(), 24)
    assert (fn.plan.block is not None) == blocked
    loss, value = fn(x, y, t)
    assert not value.requires_grad and _rel(value, ref) <= 1e-12
    for g, r in zip(torch.autograd.grad(loss, (x, y, t)), ref_grads):
        assert _rel(g, r) <= 1e-10
