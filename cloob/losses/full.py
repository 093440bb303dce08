"""Contrastive losses for image-text pretraining: CLOOB, CLIP, and the two ablation corners.

The paper's ablation grid is objective {InfoNCE, InfoLOOB} x retrieval {none, Hopfield}:

    method          objective   retrieval
    clip            infonce     none        CLIP baseline
    cloob           infoloob    hopfield    CLOOB
    infoloob        infoloob    none        CLOOB without Hopfield
    clip_hopfield   infonce     hopfield    CLIP with Hopfield retrieval

Notation (the paper's): x, y are the L2-normalised image and text embeddings of the GLOBAL
batch (gathered over ranks). Hopfield retrieval with inverse temperature beta, memory M, query q:

    retrieve(q, M) = normalize(softmax(beta * q M^T) M)

U is the image memory (x), V the text memory (y):
U_x = retrieve(x, U), U_y = retrieve(y, U), V_y = retrieve(y, V), V_x = retrieve(x, V).
Without retrieval, U_x = V_x = x and U_y = V_y = y.

The loss is computed over two (anchor, candidate) pairs, (U_x, U_y) and (V_y, V_x):

    infoloob:  L = LOOB(U_x, U_y) + LOOB(V_y, V_x)
               LOOB(A, C) = tau * mean_i[-k_ii + logsumexp_{j != i} k_ij],  k = inv_tau * A C^T
    infonce:   L = (NCE(U_x, U_y) + NCE(V_y, V_x)) / 2
               NCE(A, C) = mean_i[-k_ii + logsumexp_j k_ij]   (cross-entropy with the diagonal)

With retrieval none these are exactly the reference code's conventions: infonce is CLIP's symmetric
cross-entropy (no tau factor), infoloob is CLOOB's sum of two tau-scaled InfoLOOB terms. The InfoLOOB
value is usually negative: the positive is not in the denominator.

Implementation notes (why this is faster and lighter than four independent retrievals):
- The four retrievals need only three Gram matrices: x x^T, y y^T and y x^T (whose transpose is
  x y^T). A custom autograd function computes them once, and in the backward pass folds the two
  gradients that reach each Gram matrix before the matmul, so every Gram matrix costs one GEMM
  forward and at most two backward (autograd would spend 8 on the four products).
- The diagonal is excluded from logsumexp with -inf in place (no eye/mask matrices); positives are
  row-wise dot products, O(N d) instead of a masked N x N reduction. The logits buffer becomes the
  softmax in place and is the only N x N matrix kept per term.
- All loss arithmetic runs in float32 whatever the autocast dtype, so fp16/bf16 training at
  inv_tau = 100 cannot overflow to inf/NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cloob import methods
from cloob.methods import METHODS, Objective, Retrieval  # noqa: F401 (re-exported)


def hopfield_retrieval(query: torch.Tensor, memory: torch.Tensor, beta: float) -> torch.Tensor:
    """One update of a modern Hopfield network: normalize(softmax(beta q M^T) M), rows = patterns."""
    attn = torch.softmax(beta * (query @ memory.T), dim=-1)
    return F.normalize(attn @ memory, dim=-1)


class _HopfieldRetrievalPair(torch.autograd.Function):
    """The four CLOOB retrievals from three Gram matrices, with a hand-written backward.

    Returns (R_x, R_y), unnormalised: R_x = [P_xx; P_yx] @ x  (queries x and y on image memory),
    R_y = [P_yy; P_xy] @ y (queries y and x on text memory).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, beta: float):
        n = x.shape[0]
        # Image memory: rows 0..n-1 are queries x, rows n..2n-1 queries y. One GEMM for both.
        p_x = torch.mm(torch.cat([x, y]), x.T)  # [x x^T; y x^T]
        p_y = torch.empty_like(p_x)
        torch.mm(y, y.T, out=p_y[:n])
        p_y[n:] = p_x[n:].T  # x y^T = (y x^T)^T: no GEMM
        for p in (p_x, p_y):
            _softmax_rows_(p, beta)
        r_x = torch.mm(p_x, x)
        r_y = torch.mm(p_y, y)
        # r_x, r_y are saved for the row dots of the softmax backward (F.normalize keeps them anyway).
        ctx.save_for_backward(x, y, p_x, p_y, r_x, r_y)
        ctx.beta = beta
        return r_x, r_y

    @staticmethod
    def backward(ctx, g_x: torch.Tensor, g_y: torch.Tensor):
        x, y, p_x, p_y, r_x, r_y = ctx.saved_tensors
        beta, n = ctx.beta, x.shape[0]
        g_x = g_x.contiguous()
        g_y = g_y.contiguous()
        # Through R = P M: dM += P^T dR (here), dP = dR M^T (per block below).
        dx = torch.mm(p_x.T, g_x)
        dy = torch.mm(p_y.T, g_y)

        def d_scores(rows: slice, g, p, r, m) -> torch.Tensor:
            # dS = beta * P * (dP - <dP, P>_row) for one block of query rows; <dP, P>_row = <dR, R>_row.
            ds = torch.mm(g[rows], m.T)
            return ds.sub_(_rowdot(g[rows], r[rows])).mul_(p[rows]).mul_(beta)

        # Through the Gram matrices, one N x N block at a time so each is freed after its GEMM
        # (peak: the 4 saved N x N softmax blocks + 2). s_xx = x x^T and s_yy = y y^T are symmetric:
        # their two gradient paths fold into one GEMM with the symmetrised block.
        top, bottom = slice(0, n), slice(n, 2 * n)
        dx.addmm_(_symmetrise_(d_scores(top, g_x, p_x, r_x, x)), x)
        dy.addmm_(_symmetrise_(d_scores(top, g_y, p_y, r_y, y)), y)
        # s_yx = y x^T feeds queries y on the image memory and, transposed, queries x on the text memory.
        d_yx = d_scores(bottom, g_x, p_x, r_x, x)
        d_yx.add_(d_scores(bottom, g_y, p_y, r_y, y).T)
        dx.addmm_(d_yx.T, y)
        dy.addmm_(d_yx, x)
        return dx, dy, None


def _symmetrise_(a: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """In place: a <- a + a^T, tile by tile (no N x N temporary)."""
    n = a.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            upper = a[i:i + tile, j:j + tile]
            lower = a[j:j + tile, i:i + tile]
            both = upper + lower.T
            upper.copy_(both)
            if i != j:
                lower.copy_(both.T)
    return a


def _rowdot(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # <dP_i, P_i> = sum_j P_ij <dR_i, M_j> = <dR_i, R_i> with R = P M saved from the forward:
    # O(N d) instead of an N x N pass (and no recomputation of P M, which is an N^2 d GEMM).
    return (g * r).sum(1, keepdim=True)


def _softmax_rows_(s: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: s <- softmax(beta * s) over rows. Avoids new N x N buffers (page faults on CPU).

    Returns the row max and the row sum of exp(beta * s - max), so logsumexp = log(sum) + max.
    """
    if beta != 1.0:
        s.mul_(beta)
    row_max = s.amax(dim=1, keepdim=True)
    s.sub_(row_max).exp_()
    row_sum = s.sum(dim=1, keepdim=True)
    s.div_(row_sum)
    return row_max, row_sum


def hopfield_retrieve_all(
    x: torch.Tensor, y: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_x, U_y, V_y, V_x), each L2-normalised, from a shared-Gram custom autograd function."""
    n = x.shape[0]
    r_x, r_y = _HopfieldRetrievalPair.apply(x, y, beta)
    r_x = F.normalize(r_x, dim=-1)
    r_y = F.normalize(r_y, dim=-1)
    return r_x[:n], r_x[n:], r_y[:n], r_y[n:]


class _RowLogSumExp(torch.autograd.Function):
    """logsumexp_j (A C^T)_ij per row i, optionally without j = i; saves only the softmax.

    The N x N logits buffer becomes the softmax in place, which is all the backward needs
    (d lse_i / d k_ij = softmax_ij), so one N x N matrix is kept and one more is made in the
    backward, where torch.logsumexp on a materialised matrix keeps its input and makes three.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, c: torch.Tensor, leave_one_out: bool):
        p = torch.mm(a, c.T)
        if leave_one_out:
            # -inf, not -1000: exact, and the row stays finite for N >= 2.
            p.diagonal().fill_(float("-inf"))
        row_max, row_sum = _softmax_rows_(p)
        ctx.save_for_backward(a, c, p)
        return (row_sum.log_() + row_max).squeeze(1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, c, p = ctx.saved_tensors
        dk = p * g.unsqueeze(1)
        return torch.mm(dk, c), torch.mm(dk.T, a), None


def _contrastive_rows(
    anchors: torch.Tensor, candidates: torch.Tensor, inv_tau: torch.Tensor, leave_one_out: bool
) -> torch.Tensor:
    """mean_i[-k_ii + logsumexp_j k_ij] with k = inv_tau A C^T; j != i when leave_one_out."""
    scaled = anchors * inv_tau  # scale N x d, not N x N
    positives = (scaled * candidates).sum(dim=1)
    lse = _RowLogSumExp.apply(scaled.contiguous(), candidates.contiguous(), leave_one_out)
    return (lse - positives).mean()


def info_loob(anchors: torch.Tensor, candidates: torch.Tensor, inv_tau: torch.Tensor) -> torch.Tensor:
    """LOOB(A, C) = tau * mean_i[-k_ii + logsumexp_{j != i} k_ij]."""
    return _contrastive_rows(anchors, candidates, inv_tau, leave_one_out=True) / inv_tau


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, inv_tau: torch.Tensor) -> torch.Tensor:
    """NCE(A, C) = mean_i CE(k_i, i) = mean_i[-k_ii + logsumexp_j k_ij]."""
    return _contrastive_rows(anchors, candidates, inv_tau, leave_one_out=False)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    inv_tau: torch.Tensor | float,
    *,
    objective: Objective = "infoloob",
    retrieval: Retrieval = "hopfield",
    beta: float = 8.0,
) -> torch.Tensor:
    """The loss of one corner of the ablation grid on already-normalised global-batch features."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use {' or '.join(map(repr, OBJECTIVES))}")
    if retrieval not in RETRIEVALS:
        raise ValueError(f"unknown retrieval {retrieval!r}: use {' or '.join(map(repr, RETRIEVALS))}")
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"image and text features must both be (N, d); got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] < 2:
        raise ValueError("a contrastive loss needs at least 2 pairs in the global batch")
    # Loss arithmetic in float32 (or float64 if given) regardless of autocast.
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        x = image_features.to(dtype)
        y = text_features.to(dtype)
        inv_tau = torch.as_tensor(inv_tau, dtype=dtype, device=x.device)
        u_x, u_y, v_y, v_x = RETRIEVALS[retrieval](x, y, beta)
        return OBJECTIVES[objective](u_x, u_y, v_y, v_x, inv_tau)


def _no_retrieval(x: torch.Tensor, y: torch.Tensor, beta: float):
    return x, y, y, x


def _infoloob(u_x, u_y, v_y, v_x, inv_tau: torch.Tensor) -> torch.Tensor:
    return info_loob(u_x, u_y, inv_tau) + info_loob(v_y, v_x, inv_tau)


def _infonce(u_x, u_y, v_y, v_x, inv_tau: torch.Tensor) -> torch.Tensor:
    return (info_nce(u_x, u_y, inv_tau) + info_nce(v_y, v_x, inv_tau)) / 2


# The loss functions that cloob/methods.py's Method.retrieval and Method.objective name; rows.py has
# the same two tables for the sharded and blocked path. retrieval(x, y, beta) -> (U_x, U_y, V_y, V_x);
# objective(U_x, U_y, V_y, V_x, inv_tau) -> the loss.
RETRIEVALS = {"none": _no_retrieval, "hopfield": hopfield_retrieve_all}
OBJECTIVES = {"infonce": _infonce, "infoloob": _infoloob}


@dataclass(frozen=True)
class LossSpec:
    objective: Objective = "infoloob"
    retrieval: Retrieval = "hopfield"
    beta: float = 8.0

    @classmethod
    def from_method(cls, method: str, beta: float = 8.0) -> LossSpec:
        m = methods.get(method)
        return cls(m.objective, m.retrieval, beta)

    def __call__(self, image_features, text_features, inv_tau) -> torch.Tensor:
        """The loss on the path training would take for this batch (cloob.losses.plan): the full path
        here while its N x N buffers fit in the memory free now, else the blocked rows path."""
        from cloob.losses.plan import planned_loss  # plan.py imports this module

        return planned_loss(image_features, text_features, inv_tau,
                            objective=self.objective, retrieval=self.retrieval, beta=self.beta)
