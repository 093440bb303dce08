"""Tests of cloob/losses/full.py against an independent transcription of the formulas in its docstring.

The `_t_*` functions below are a deliberately naive, loop-based transcription of the formulas in
the docstring of cloob/losses/full.py (CLOOB, CLIP and the two off-corners of the 2x2 grid). They
use no code from the cloob package, so every comparison checks the fast implementation (shared
Gram matrices, hand-written backward, in-place softmax, -inf diagonal) against the math.
"""

from __future__ import annotations

import math

import pytest
import torch

from cloob.losses import (
    METHODS,
    LossSpec,
    contrastive_loss,
    hopfield_retrieval,
    hopfield_retrieve_all,
    info_loob,
    info_nce,
)

# --------------------------------------------------------------------------------------------------
# Independent transcription of cloob/losses/full.py's formulas (plain torch ops and explicit loops).
# --------------------------------------------------------------------------------------------------


def _t_normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum(dim=1, keepdim=True))


def _t_softmax_row(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max())
    return e / e.sum()


def _t_logsumexp(v: torch.Tensor) -> torch.Tensor:
    m = v.max().detach()
    return m + torch.log(torch.exp(v - m).sum())


def _t_retrieve(q: torch.Tensor, memory: torch.Tensor, beta: float) -> torch.Tensor:
    """retrieve(q, M) = normalize(softmax(beta q M^T) M), softmax over the stored patterns (rows)."""
    rows = []
    for i in range(q.shape[0]):
        attn = _t_softmax_row(beta * (memory @ q[i]))  # (n_memory,)
        rows.append((attn[:, None] * memory).sum(dim=0))
    return _t_normalize(torch.stack(rows))


def _t_loob(a: torch.Tensor, c: torch.Tensor, inv_tau) -> torch.Tensor:
    """LOOB(A, C) = tau * mean_i[-k_ii + logsumexp_{j != i} k_ij], k = inv_tau A C^T."""
    n = a.shape[0]
    k = inv_tau * (a @ c.T)
    terms = []
    for i in range(n):
        others = torch.cat([k[i, :i], k[i, i + 1 :]])
        terms.append(-k[i, i] + _t_logsumexp(others))
    return (1.0 / inv_tau) * torch.stack(terms).mean()


def _t_nce(a: torch.Tensor, c: torch.Tensor, inv_tau) -> torch.Tensor:
    """Cross-entropy of inv_tau A C^T with the diagonal as target, mean over rows."""
    n = a.shape[0]
    k = inv_tau * (a @ c.T)
    terms = []
    for i in range(n):
        terms.append(-k[i, i] + _t_logsumexp(k[i]))
    return torch.stack(terms).mean()


def _t_loss(x, y, inv_tau, objective: str, retrieval: str, beta: float) -> torch.Tensor:
    if retrieval == "hopfield":
        big_u, big_v = x, y  # U = image memory, V = text memory
        u_x = _t_retrieve(x, big_u, beta)
        u_y = _t_retrieve(y, big_u, beta)
        v_y = _t_retrieve(y, big_v, beta)
        v_x = _t_retrieve(x, big_v, beta)
    else:
        u_x, u_y, v_y, v_x = x, y, y, x
    if objective == "infoloob":
        # L_CLOOB = LOOB(U_x, U_y) + LOOB(V_y, V_x); with no retrieval LOOB(X, Y) + LOOB(Y, X).
        return _t_loob(u_x, u_y, inv_tau) + _t_loob(v_y, v_x, inv_tau)
    # L_CLIP = (CE(inv_tau X Y^T) + CE(inv_tau Y X^T)) / 2; with retrieval on the retrieved pairs.
    return (_t_nce(u_x, u_y, inv_tau) + _t_nce(v_y, v_x, inv_tau)) / 2


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

CORNERS = [
    ("clip", "infonce", "none"),
    ("cloob", "infoloob", "hopfield"),
    ("infoloob", "infoloob", "none"),
    ("clip_hopfield", "infonce", "hopfield"),
]

SIZES = [(2, 3), (2, 16), (5, 4), (9, 8), (16, 32)]


def _features(n: int, d: int, dtype, seed: int, noise: float = 0.6):
    """Normalised image features and correlated text features (so retrieval mixes patterns)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    x = _t_normalize(x)
    y = _t_normalize(y)
    inv_tau = float(torch.empty(1, dtype=torch.float64).uniform_(1.0, 100.0, generator=g))
    beta = float(torch.empty(1, dtype=torch.float64).uniform_(0.5, 20.0, generator=g))
    return x.to(dtype), y.to(dtype), inv_tau, beta


def _value_and_grads(fn, x, y, inv_tau):
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    t = torch.tensor(inv_tau, dtype=x.dtype, requires_grad=True)
    loss = fn(x, y, t)
    gx, gy, gt = torch.autograd.grad(loss, (x, y, t))
    return loss.detach(), gx, gy, gt


# --------------------------------------------------------------------------------------------------
# The four corners against the transcription
# --------------------------------------------------------------------------------------------------


def test_methods_table_is_the_2x2_grid():
    assert {m: (METHODS[m].objective, METHODS[m].retrieval) for m, _, _ in CORNERS} == {m: (o, r) for m, o, r in CORNERS}
    assert len(METHODS) == 4
    for method, objective, retrieval in CORNERS:
        spec = LossSpec.from_method(method, beta=3.5)
        assert (spec.objective, spec.retrieval, spec.beta) == (objective, retrieval, 3.5)


@pytest.mark.parametrize("method,objective,retrieval", CORNERS)
@pytest.mark.parametrize("n,d", SIZES)
def test_corner_matches_transcription_float64(method, objective, retrieval, n, d):
    x, y, inv_tau, beta = _features(n, d, torch.float64, seed=1000 * n + d)
    ref, rgx, rgy, rgt = _value_and_grads(
        lambda a, b, t: _t_loss(a, b, t, objective, retrieval, beta), x, y, inv_tau
    )
    spec = LossSpec.from_method(method, beta=beta)
    by_kw = lambda a, b, t: contrastive_loss(  # noqa: E731
        a, b, t, objective=objective, retrieval=retrieval, beta=beta
    )
    for fn in (spec, by_kw):
        val, gx, gy, gt = _value_and_grads(fn, x, y, inv_tau)
        assert val.dtype == torch.float64
        torch.testing.assert_close(val, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gy, rgy, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gt, rgt, rtol=1e-9, atol=1e-10)
    # A float inv_tau gives the same value as a tensor one.
    torch.testing.assert_close(spec(x, y, inv_tau), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method,objective,retrieval", CORNERS)
@pytest.mark.parametrize("n,d", [(2, 8), (7, 5), (16, 64)])
def test_corner_matches_transcription_float32(method, objective, retrieval, n, d):
    x, y, inv_tau, beta = _features(n, d, torch.float32, seed=7 * n + d)
    # Reference in float64 on exactly the same (float32-representable) inputs.
    ref, rgx, rgy, rgt = _value_and_grads(
        lambda a, b, t: _t_loss(a, b, t, objective, retrieval, beta),
        x.double(), y.double(), inv_tau,
    )
    val, gx, gy, gt = _value_and_grads(LossSpec.from_method(method, beta=beta), x, y, inv_tau)
    assert val.dtype == torch.float32
    torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), rgx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gy.double(), rgy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gt.double(), rgt, rtol=1e-4, atol=1e-5)


def test_transcription_is_not_degenerate():
    """The corners really differ, so the per-corner comparisons could catch a swapped corner."""
    x, y, inv_tau, beta = _features(9, 8, torch.float64, seed=3)
    vals = {m: float(_t_loss(x, y, inv_tau, o, r, beta)) for m, o, r in CORNERS}
    ours = {m: float(LossSpec.from_method(m, beta)(x, y, inv_tau)) for m, _, _ in CORNERS}
    for m in vals:
        others = [vals[o] for o in vals if o != m]
        assert all(abs(vals[m] - v) > 1e-3 for v in others), vals
        assert ours[m] == pytest.approx(vals[m], rel=1e-10, abs=1e-10)
    # Retrieval changes the features (not close to the identity at this beta and d).
    assert (_t_retrieve(x, x, beta) - x).abs().max() > 1e-2


def test_non_contiguous_and_partial_requires_grad():
    """Transposed-view inputs, and text features that are frozen (no grad)."""
    x, y, inv_tau, beta = _features(6, 5, torch.float64, seed=11)
    xt = x.T.contiguous().T.detach().requires_grad_(True)  # same values, column-major strides
    assert not xt.is_contiguous()
    for objective, retrieval in [("infoloob", "hopfield"), ("infonce", "hopfield")]:
        loss = contrastive_loss(xt, y, inv_tau, objective=objective, retrieval=retrieval, beta=beta)
        (gx,) = torch.autograd.grad(loss, xt)
        xr = x.clone().requires_grad_(True)
        ref = _t_loss(xr, y, inv_tau, objective, retrieval, beta)
        (rgx,) = torch.autograd.grad(ref, xr)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-10)


def test_info_loob_and_info_nce_directly():
    x, y, inv_tau, _ = _features(7, 6, torch.float64, seed=5)
    t = torch.tensor(inv_tau, dtype=torch.float64)
    torch.testing.assert_close(info_loob(x, y, t), _t_loob(x, y, inv_tau), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(info_nce(y, x, t), _t_nce(y, x, inv_tau), rtol=1e-10, atol=1e-10)
    # Independent check of NCE against torch's cross-entropy, and of the symmetric CLIP loss.
    labels = torch.arange(7)
    ce = torch.nn.functional.cross_entropy(inv_tau * x @ y.T, labels)
    torch.testing.assert_close(info_nce(x, y, t), ce, rtol=1e-10, atol=1e-10)
    clip = (ce + torch.nn.functional.cross_entropy(inv_tau * y @ x.T, labels)) / 2
    torch.testing.assert_close(
        contrastive_loss(x, y, inv_tau, objective="infonce", retrieval="none"), clip,
        rtol=1e-10, atol=1e-10,
    )


# --------------------------------------------------------------------------------------------------
# gradcheck (float64) w.r.t. x, y and inv_tau
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m, _, _ in CORNERS])
@pytest.mark.parametrize("n,d", [(2, 3), (5, 4)])
def test_gradcheck(method, n, d):
    x, y, inv_tau, beta = _features(n, d, torch.float64, seed=31 * n + d)
    # Keep inv_tau moderate so finite differences stay well-conditioned.
    t = torch.tensor(min(inv_tau, 20.0), dtype=torch.float64, requires_grad=True)
    spec = LossSpec.from_method(method, beta=min(beta, 10.0))
    assert torch.autograd.gradcheck(
        spec, (x.clone().requires_grad_(True), y.clone().requires_grad_(True), t),
        eps=1e-6, atol=1e-6, rtol=1e-5,
    )


def test_gradcheck_hopfield_retrieve_all():
    """The hand-written backward of the shared-Gram retrieval, all four outputs at once."""
    x, y, _, _ = _features(5, 4, torch.float64, seed=77)
    assert torch.autograd.gradcheck(
        lambda a, b: hopfield_retrieve_all(a, b, 3.0),
        (x.clone().requires_grad_(True), y.clone().requires_grad_(True)),
        eps=1e-6, atol=1e-6, rtol=1e-5,
    )


def test_gradcheck_unnormalised_retrieval_pair():
    """The custom Function on its own, before F.normalize.

    Through the public API the softmax row-dot term <dR_i, R_i> of the backward is exactly zero
    (the gradient of normalize(R) is orthogonal to R), so only this test can catch an error there.
    """
    from cloob.losses.full import _HopfieldRetrievalPair

    x, y, _, _ = _features(5, 4, torch.float64, seed=78)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: _HopfieldRetrievalPair.apply(a, b, 2.0), (xr, yr), eps=1e-6, atol=1e-6, rtol=1e-5
    )
    # Values: R_x = [softmax(b x x^T); softmax(b y x^T)] x, R_y = [softmax(b y y^T); ...(b x y^T)] y.
    r_x, r_y = _HopfieldRetrievalPair.apply(x, y, 2.0)
    for r, q, m in ((r_x[:5], x, x), (r_x[5:], y, x), (r_y[:5], y, y), (r_y[5:], x, y)):
        expect = torch.stack([_t_softmax_row(2.0 * (m @ q[i])) @ m for i in range(5)])
        torch.testing.assert_close(r, expect, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# hopfield_retrieve_all == four hopfield_retrieval calls (values and gradients)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,beta", [(2, 4, 8.0), (8, 6, 2.5), (13, 32, 30.0)])
def test_retrieve_all_equals_four_retrievals(n, d, beta):
    x, y, _, _ = _features(n, d, torch.float64, seed=n + d)
    xa, ya = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    xb, yb = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    fused = hopfield_retrieve_all(xa, ya, beta)
    single = (
        hopfield_retrieval(xb, xb, beta),  # U_x
        hopfield_retrieval(yb, xb, beta),  # U_y
        hopfield_retrieval(yb, yb, beta),  # V_y
        hopfield_retrieval(xb, yb, beta),  # V_x
    )
    for f, s, q, m in zip(fused, single, (x, y, y, x), (x, x, y, y)):
        torch.testing.assert_close(f, s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f, _t_retrieve(q, m, beta), rtol=1e-10, atol=1e-12)
    # Gradients under a random linear functional of all four outputs.
    g = torch.Generator().manual_seed(99)
    weights = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4)]
    ga = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, fused)), (xa, ya))
    gb = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, single)), (xb, yb))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------------------
# Mixed precision: autocast bf16 / fp16 features, inv_tau = 100
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [8.0, 100.0])
@pytest.mark.parametrize("method", [m for m, _, _ in CORNERS])
def test_autocast_low_precision_features(amp_dtype, beta, method):
    torch.manual_seed(0)
    n, d_in, d = 64, 48, 32
    proj = torch.nn.Linear(d_in, d)
    inputs_img = torch.randn(n, d_in)
    # Noisy pairs: at inv_tau = 100 the losses stay away from 0 and the gradients are non-trivial.
    inputs_txt = inputs_img + 2.0 * torch.randn(n, d_in)
    log_inv_tau = torch.tensor(math.log(100.0), requires_grad=True)
    spec = LossSpec.from_method(method, beta=beta)

    def run(autocast: bool):
        proj.zero_grad(set_to_none=True)
        log_inv_tau.grad = None
        with torch.autocast("cpu", dtype=amp_dtype, enabled=autocast):
            x = torch.nn.functional.normalize(proj(inputs_img), dim=-1)
            y = torch.nn.functional.normalize(proj(inputs_txt), dim=-1)
            if autocast:
                assert x.dtype == amp_dtype and y.dtype == amp_dtype
            loss = spec(x, y, log_inv_tau.exp())
        loss.backward()
        grads = [proj.weight.grad.clone(), proj.bias.grad.clone(), log_inv_tau.grad.clone()]
        return loss.detach(), grads

    loss32, grads32 = run(autocast=False)
    loss_lp, grads_lp = run(autocast=True)
    assert loss_lp.dtype == torch.float32  # loss arithmetic is float32 whatever autocast does
    assert torch.isfinite(loss_lp)
    for g in grads_lp:
        assert torch.isfinite(g).all()
    # bf16 keeps 8 mantissa bits, fp16 11. Measured at this seed: |loss_lp - loss32| <= 7e-3 (bf16)
    # and <= 4e-3 (fp16) with |loss32| up to ~25; the bounds below leave about 10x margin.
    tol = 1e-2 if amp_dtype == torch.bfloat16 else 2e-3
    assert abs(float(loss_lp) - float(loss32)) <= tol * max(1.0, abs(float(loss32))), (
        float(loss_lp), float(loss32)
    )
    # Gradients: same direction, roughly same size.
    for g_lp, g32 in zip(grads_lp, grads32):
        g_lp, g32 = g_lp.double().flatten(), g32.double().flatten()
        assert g32.norm() > 1e-6  # the setup must produce real gradients
        cos = float(g_lp @ g32 / (g_lp.norm() * g32.norm()))
        assert cos > 0.98, cos
        assert abs(float(g_lp.norm() / g32.norm()) - 1.0) < 0.2


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_unknown_method_raises():
    with pytest.raises(ValueError, match=r"unknown method 'cloob2'.*clip.*clip_hopfield.*cloob"):
        LossSpec.from_method("cloob2")


def test_unknown_objective_or_retrieval_raises():
    x, y, _, _ = _features(4, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"unknown objective 'infoNCE'.*'infonce'.*'infoloob'"):
        contrastive_loss(x, y, 30.0, objective="infoNCE")
    with pytest.raises(ValueError, match=r"unknown retrieval 'hopfeld'.*'none'.*'hopfield'"):
        contrastive_loss(x, y, 30.0, retrieval="hopfeld")
    with pytest.raises(ValueError, match="unknown objective"):
        LossSpec(objective="nce")(x, y, 30.0)


@pytest.mark.parametrize(
    "shape_x,shape_y",
    [((4, 3), (5, 3)), ((4, 3), (4, 2)), ((4,), (4,)), ((2, 4, 3), (2, 4, 3)), ((4, 3), (3, 4))],
)
def test_mismatched_shapes_raise(shape_x, shape_y):
    with pytest.raises(ValueError, match=r"must both be \(N, d\); got"):
        contrastive_loss(torch.randn(shape_x), torch.randn(shape_y), 30.0)


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("method", [m for m, _, _ in CORNERS])
def test_batch_smaller_than_two_raises(n, method):
    with pytest.raises(ValueError, match="at least 2 pairs"):
        LossSpec.from_method(method)(torch.randn(n, 4), torch.randn(n, 4), 30.0)


@pytest.mark.parametrize("n, tile", [(1, 4), (7, 3), (12, 4), (10, 16)])
def test_symmetrise_in_place_by_tiles(n, tile):
    from cloob.losses.full import _symmetrise_

    a = torch.randn(n, n, dtype=torch.float64)
    want = a + a.T
    out = _symmetrise_(a, tile=tile)
    assert out is a and torch.equal(a, want)
