"""Image-to-text and text-to-image recall@k on captioned pairs.

Pair i is (image_i, caption_i). Identical caption strings are one text: a hit for image i is any of
the top-k texts whose caption equals caption_i, and a hit for text j is any of the top-k images whose
caption equals caption_j. With unique captions this is the usual one-positive recall@k; with repeated
captions (common in web data and in generated sets) it does not punish a model for ranking a
duplicate of the right caption first.
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)


@torch.no_grad()
def recall_at_k(images: torch.Tensor, texts: torch.Tensor, captions: list[str], ks=KS, chunk: int = 1024) -> dict:
    """images, texts: [N, D] L2-normalised; returns {i2t_r1, ..., t2i_r10} as fractions."""
    return recall_and_first_hits(images, texts, captions, ks, chunk)[0]


def recall_and_first_hits(images: torch.Tensor, texts: torch.Tensor, captions: list[str], ks=KS,
                          chunk: int = 1024) -> tuple[dict, list[bool]]:
    """recall_at_k's numbers, and per image whether a text with its own caption is ranked first (its
    i2t@1, image by image: what paired comparisons of two models need), from the same rankings."""
    groups: dict[str, int] = {}
    gid = torch.tensor([groups.setdefault(c, len(groups)) for c in captions])
    n = len(captions)
    out: dict = {}
    first_hits: list[bool] = []
    for name, queries, keys in (("i2t", images, texts), ("t2i", texts, images)):
        hits = {k: 0 for k in ks}
        kmax = min(max(ks), n)
        for s in range(0, n, chunk):
            sims = queries[s:s + chunk].float() @ keys.float().T
            top = sims.topk(kmax, dim=1).indices  # [chunk, kmax]
            match = gid[top] == gid[s:s + chunk, None]
            for k in ks:
                hits[k] += int(match[:, :min(k, kmax)].any(dim=1).sum())
            if name == "i2t":
                first_hits += match[:, 0].tolist()
        out.update({f"{name}_r{k}": hits[k] / n for k in ks})
    return out, first_hits
