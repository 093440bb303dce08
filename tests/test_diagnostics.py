"""Embedding diagnostics and recall@k on embeddings whose answers are known by construction."""


import pytest
import torch

from cloob.evaluate.diagnostics import ajne, alignment, effective_eigenvalues, uniformity
from cloob.evaluate.retrieval import recall_at_k
from cloob.evaluate.zeroshot import ClassificationMetrics


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_effective_eigenvalues_counts_the_used_dimensions():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4000, 32)
    x[:, :6] = torch.randn(4000, 6, generator=g)  # variance in 6 of 32 dimensions
    assert effective_eigenvalues(x) == 6
    x[:, 6] = 0.01 * torch.randn(4000, generator=g)  # a 7th with ~0.002% of the variance: below 1%
    assert effective_eigenvalues(x) == 6
    assert effective_eigenvalues(torch.randn(4000, 32, generator=g)) >= 30  # isotropic: nearly all


def test_uniformity_and_ajne_rank_uniform_above_clustered():
    g = torch.Generator().manual_seed(1)
    uniform = _unit(torch.randn(1500, 16, generator=g))
    clustered = _unit(torch.randn(1500, 16, generator=g) * 0.3 + torch.ones(16))
    assert uniformity(uniform) < uniformity(clustered)
    # Ajne/Prentice: about 1/4 for uniform directions in any dimension, towards n/4 for a cap.
    assert abs(ajne(uniform) - 0.25) < 0.2
    assert ajne(clustered) > 100
    # Closed forms on tiny inputs: two antipodal points have angle pi -> 2/4 - pi/(2 pi) = 0.
    pts = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert ajne(pts) == pytest.approx(0.0)
    assert uniformity(pts) == pytest.approx(-8.0)  # ||a-b||^2 = 4, t = 2
    # chunking does not change the result
    assert uniformity(uniform, chunk=7) == pytest.approx(uniformity(uniform), rel=1e-9)
    assert ajne(uniform, chunk=7) == pytest.approx(ajne(uniform), rel=1e-9)


def test_alignment_of_identical_and_opposite_pairs():
    x = _unit(torch.randn(10, 8))
    assert alignment(x, x) == pytest.approx(0.0)
    assert alignment(x, -x) == pytest.approx(4.0)


def test_recall_at_k_with_known_rankings():
    n = 12
    x = torch.eye(n)
    caps = [f"c{i}" for i in range(n)]
    r = recall_at_k(x, x, caps)
    assert r["i2t_r1"] == r["t2i_r1"] == 1.0
    # texts shifted by one: every image's best text is the wrong one, its own is second best
    y = _unit(torch.roll(x, 1, dims=0) + 0.5 * x)
    r = recall_at_k(x, y, caps)
    assert r["i2t_r1"] == 0.0 and r["i2t_r5"] == 1.0
    # ...unless the wrong text has the same caption: then it counts as a hit
    caps_dup = ["same"] * n
    assert recall_at_k(x, y, caps_dup)["i2t_r1"] == 1.0


def test_classification_metrics_by_hand():
    m = ClassificationMetrics(3)
    logits = torch.tensor([[3.0, 2, 1], [3, 2, 1], [1, 3, 2], [1, 2, 3]])
    labels = torch.tensor([0, 1, 1, 1])  # right, wrong, right, wrong
    m.update(logits, labels)
    r = m.result()
    assert r["top1"] == 0.5
    assert r["top5"] == 1.0  # k = 3 classes
    assert r["mean_per_class_recall"] == pytest.approx((1.0 + 1 / 3) / 2)  # class 2 has no images
