"""Embedding diagnostics from the CLOOB paper and from Wang & Isola (2020).

effective_eigenvalues  how many of the covariance eigenvalues (largest first) it takes to reach 99% of
                       their sum: more means more covariance structure is used (the paper's measure)
alignment              E ||x_i - y_i||^2 over matched pairs (lower: matched pairs closer)
uniformity             log E exp(-2 ||x_i - x_j||^2) over pairs i < j (lower: more uniform)
ajne                   Ajne's statistic as extended by Prentice (1978) to the hypersphere,
                       A_n = n/4 - 1/(pi n) sum_{i<j} angle(x_i, x_j). Its expectation under
                       uniformity is about 1/4 in any dimension; it grows towards n/4 as the
                       embeddings crowd into a cap (the paper: high = less uniform)
All take L2-normalised embeddings and compute in float64, in chunks (memory O(chunk x n)).
"""

from __future__ import annotations

import math

import torch


def effective_eigenvalues(x: torch.Tensor, fraction: float = 0.99) -> int:
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    cov = x.T @ x / max(len(x) - 1, 1)
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    total = eig.sum()
    if total <= 0:
        return 0
    return int((torch.cumsum(eig, 0) / total < fraction).sum()) + 1


def alignment(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x.double() - y.double()) ** 2).sum(dim=1).mean())


def _pair_sims(x: torch.Tensor, chunk: int):
    """Yields the cosine similarities of the pairs i < j, chunk by chunk."""
    x = x.double()
    n = len(x)
    for s in range(0, n, chunk):
        sims = x[s:s + chunk] @ x.T  # rows s.., all columns
        rows = torch.arange(s, min(s + chunk, n))[:, None]
        yield sims[torch.arange(n)[None, :] > rows]


def uniformity(x: torch.Tensor, t: float = 2.0, chunk: int = 1024) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    # ||a-b||^2 = 2 - 2 cos for unit vectors; logsumexp keeps it finite when the mean underflows.
    parts = [torch.logsumexp(-t * (2 - 2 * s), 0) for s in _pair_sims(x, chunk) if len(s)]
    return float(torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1) / 2))


def ajne(x: torch.Tensor, chunk: int = 1024) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    total = sum(float(torch.arccos(s.clamp(-1, 1)).sum()) for s in _pair_sims(x, chunk))
    return n / 4 - total / (math.pi * n)


def diagnostics(images: torch.Tensor, texts: torch.Tensor, paired_texts: torch.Tensor | None) -> dict:
    """The results-table columns for image embeddings, text embeddings, and (image, text) pairs."""
    return {"image_effective_eigenvalues": effective_eigenvalues(images),
            "text_effective_eigenvalues": effective_eigenvalues(texts),
            "alignment": alignment(images, paired_texts) if paired_texts is not None else None,
            "image_uniformity": uniformity(images), "text_uniformity": uniformity(texts),
            "image_ajne": ajne(images), "text_ajne": ajne(texts)}
