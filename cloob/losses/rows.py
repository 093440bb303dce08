"""The contrastive losses row by row: a set of query/anchor rows against a whole memory/candidate set.

Every term of the loss is row-local (cloob/losses/__init__.py has the notation): a retrieval row
depends on its own query and the whole memory, an InfoLOOB/InfoNCE row on its own anchor and all
candidates. So the loss of a global batch of N pairs splits exactly into the sum of the losses of
any partition of its rows:

    L = sum_r L_r,   L_r = (1/N) sum_{i in rows_r} loss_i

That gives two things from one formulation:
- sharding (cloob/train/sharded_loss.py): rank r computes L_r for its own B = N/W rows, against
  memories and candidates gathered from all ranks with autograd, so it does O(N^2 d / W) work and
  holds O(B N) of scores instead of O(N^2);
- blocking: the rows are taken `block` at a time and the B x N scores of a block are recomputed in
  the backward pass instead of kept (as flash attention does), so peak memory is O(N d + block N)
  whatever N is.

The functions below are exact (the same math as cloob/losses/full.py, in another order of
summation): with block >= the number of rows they keep the softmax for the backward pass as the
full path does, else they keep only each row's log-sum-exp and recompute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _blocks(n: int, block: int):
    for i in range(0, n, block):
        yield slice(i, min(i + block, n))


class _RetrieveRows(torch.autograd.Function):
    """R = softmax(beta Q M^T) M for the rows of Q (unnormalised), `block` rows at a time.

    The N-wide passes are what costs beside the products, so scalars and row vectors are folded into
    the products' small operands or into addmm's bias: beta scales Q (block x d), not the scores."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, m: torch.Tensor, beta: float, block: int):
        n = q.shape[0]
        out = q.new_empty(n, m.shape[1])
        lse = q.new_empty(n, 1)  # of beta * q m^T per row, for recomputing P in the backward pass
        p_kept = None
        for rows in _blocks(n, block):
            s = torch.mm(q[rows] * beta, m.T)
            row_max = s.amax(dim=1, keepdim=True)
            s.sub_(row_max).exp_()
            row_sum = s.sum(dim=1, keepdim=True)
            torch.mm(s, m, out=out[rows])
            out[rows] /= row_sum
            lse[rows] = row_sum.log().add_(row_max)
            if block >= n:
                p_kept = s.div_(row_sum)
        ctx.save_for_backward(q, m, out, lse, p_kept if p_kept is not None else q.new_empty(0))
        ctx.beta, ctx.block, ctx.kept = beta, block, p_kept is not None
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        q, m, out, lse, p_kept = ctx.saved_tensors
        beta = ctx.beta
        g = g.contiguous()
        dq = torch.empty_like(q)
        dm = torch.zeros_like(m)
        for rows in _blocks(q.shape[0], ctx.block):
            q_b, g_b = q[rows], g[rows]
            p = p_kept if ctx.kept else torch.addmm(lse[rows].neg(), q_b * beta, m.T).exp_()
            dm.addmm_(p.T, g_b)  # through R = P M, M as values
            # dS = beta P * (dP - <dP, P>_row), dP = dR M^T; <dP_i, P_i> = <dR_i, R_i> (R saved).
            ds = torch.addmm((g_b * out[rows]).sum(1, keepdim=True).neg_(), g_b, m.T).mul_(p)  # dS / beta
            torch.mm(ds, m, out=dq[rows])
            dq[rows] *= beta
            dm.addmm_(ds.T, q_b, alpha=beta)  # M as keys
        return dq, dm, None, None


def _mask_diagonal_(s: torch.Tensor, offset: int, rows: slice) -> torch.Tensor:
    # -inf, not a large negative number: exact, and the row stays finite for N >= 2
    s[:, offset + rows.start:offset + rows.stop].diagonal().fill_(float("-inf"))
    return s


class _LogSumExpRows(torch.autograd.Function):
    """lse_i = logsumexp_j (A C^T)_ij for the rows of A; without j = offset + i when leave_one_out."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, c: torch.Tensor, offset: int, leave_one_out: bool, block: int):
        n = a.shape[0]
        lse = a.new_empty(n, 1)
        p_kept = None
        for rows in _blocks(n, block):
            s = torch.mm(a[rows], c.T)
            if leave_one_out:
                _mask_diagonal_(s, offset, rows)
            row_max = s.amax(dim=1, keepdim=True)
            s.sub_(row_max).exp_()
            row_sum = s.sum(dim=1, keepdim=True)
            lse[rows] = row_sum.log().add_(row_max)
            if block >= n:
                p_kept = s.div_(row_sum)
        ctx.save_for_backward(a, c, lse, p_kept if p_kept is not None else a.new_empty(0))
        ctx.offset, ctx.leave_one_out, ctx.block, ctx.kept = offset, leave_one_out, block, p_kept is not None
        return lse.squeeze(1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, c, lse, p_kept = ctx.saved_tensors
        da = torch.empty_like(a)
        dc = torch.zeros_like(c)
        g = g.unsqueeze(1)
        for rows in _blocks(a.shape[0], ctx.block):
            a_b = a[rows]
            if ctx.kept:
                p = p_kept
            else:
                p = torch.addmm(lse[rows].neg(), a_b, c.T)
                if ctx.leave_one_out:
                    _mask_diagonal_(p, ctx.offset, rows)
                p.exp_()
            # d lse_i / d k_ij = P_ij; the row weights g_i go on the small operands
            torch.mm(p, c, out=da[rows])
            da[rows] *= g[rows]
            dc.addmm_(p.T, a_b * g[rows])
        return da, dc, None, None, None


def retrieve_rows(query: torch.Tensor, memory: torch.Tensor, beta: float, block: int | None = None) -> torch.Tensor:
    """normalize(softmax(beta q M^T) M) for each row q of query, `block` rows at a time."""
    return F.normalize(_RetrieveRows.apply(query, memory, beta, block or query.shape[0]), dim=-1)


def _term_sum(anchors, positives, candidates, inv_tau, leave_one_out: bool, offset: int, block: int | None):
    """sum_i [-k_ii + logsumexp_j k_ij] over the anchor rows, k = inv_tau A C^T; the positive of anchor
    i is candidates[offset + i], given as positives[i] (the same values: the local copy carries its
    gradient directly); j != offset + i when leave_one_out."""
    scaled = anchors * inv_tau  # scale n x d, not n x N
    pos = (scaled * positives).sum(dim=1)
    lse = _LogSumExpRows.apply(scaled.contiguous(), candidates.contiguous(), offset, leave_one_out,
                               block or anchors.shape[0])
    return (lse - pos).sum()


def rows_loss(x: torch.Tensor, y: torch.Tensor, inv_tau: torch.Tensor, *, objective: str, retrieval: str,
              beta: float, n_global: int | None = None, offset: int = 0, gather: Gather = _identity,
              block: int | None = None) -> torch.Tensor:
    """The share of the global loss of the rows x, y (normalised features, rows offset.. of the global
    batch): the sum of these shares over a partition of the rows is the loss of cloob/losses/full.py.

    gather(t) must return the rows of t from every part in order, with autograd (its backward summing
    each part's gradient back to its owner); the identity for one process. Arithmetic is float32
    (float64 if given) whatever the autocast dtype, as in the full path."""
    if objective not in OBJECTIVES or retrieval not in RETRIEVALS:
        raise ValueError(f"unknown objective {objective!r} or retrieval {retrieval!r}: use one of "
                         f"{', '.join(OBJECTIVES)} and one of {', '.join(RETRIEVALS)}")
    n = n_global or x.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.to(dtype), y.to(dtype)
        inv_tau = torch.as_tensor(inv_tau, dtype=dtype, device=x.device)
        big_x, big_y = gather(x), gather(y)
        u_x, u_y, v_y, v_x, cand_u, cand_v = RETRIEVALS[retrieval](x, y, big_x, big_y, beta, block, gather)
        loo, mean = OBJECTIVES[objective]
        total = _term_sum(u_x, u_y, cand_u, inv_tau, loo, offset, block) + \
            _term_sum(v_y, v_x, cand_v, inv_tau, loo, offset, block)
        return mean(total, n, inv_tau)


def _no_retrieval(x, y, big_x, big_y, beta, block, gather):
    return x, y, y, x, big_y, big_x


def _hopfield_rows(x, y, big_x, big_y, beta, block, gather):
    # U: image memory, V: text memory. Anchors U_x, V_y stay local; candidates U_y, V_x are gathered.
    u_x, u_y = retrieve_rows(x, big_x, beta, block), retrieve_rows(y, big_x, beta, block)
    v_y, v_x = retrieve_rows(y, big_y, beta, block), retrieve_rows(x, big_y, beta, block)
    return u_x, u_y, v_y, v_x, gather(u_y), gather(v_x)


# The row-wise forms of cloob/losses/full.py's RETRIEVALS and OBJECTIVES (same keys, the names that
# cloob/methods.py's Method.retrieval and Method.objective give). retrieval -> (U_x, U_y, V_y, V_x and
# the gathered candidates of the two terms); objective -> (leave the positive out of the denominator,
# the mean of the summed rows of both terms).
RETRIEVALS = {"none": _no_retrieval, "hopfield": _hopfield_rows}
OBJECTIVES = {
    "infonce": (False, lambda total, n, inv_tau: total / (2 * n)),
    "infoloob": (True, lambda total, n, inv_tau: total / (n * inv_tau)),  # tau * mean over the N rows, per term
}
