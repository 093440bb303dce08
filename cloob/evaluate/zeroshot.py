"""The standard CLIP zero-shot classifier, its cache, and classification metrics.

Classifier: for each class, the prompt templates filled with its name are encoded, each embedding
L2-normalised, their mean taken and normalised again; the classifier is the [dim, classes] matrix of
these. An image's logits are its normalised embedding times that matrix.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import torch

from cloob.storage import Location

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when the way a classifier is computed changes


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: list[str], templates: list[str], device,
                     autocast=None, texts_per_batch: int = 512) -> torch.Tensor:
    """[dim, classes] float32 zero-shot weights."""
    texts = [t.format(c) for c in classnames for t in templates]
    chunks = []
    for i in range(0, len(texts), texts_per_batch):
        tokens = tokenizer(texts[i:i + texts_per_batch]).to(device)
        with autocast() if autocast else _null():
            emb = model.encode_text(tokens)
        chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1))
    emb = torch.cat(chunks).reshape(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1).T.contiguous()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def classifier_key(checkpoint_id: str, arch: str, classnames: list[str], templates: list[str], precision: str) -> str:
    blob = json.dumps([CACHE_FORMAT, checkpoint_id, arch, classnames, templates, precision], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ClassifierCache:
    """Text classifiers stored as `<root>/<key>.pt`, keyed by (checkpoint, arch, class names,
    templates, precision): one text pass per (checkpoint, dataset), ever."""

    def __init__(self, root: str | None):
        self.root = root.rstrip("/") if root else None
        self._loc = Location(self.root) if self.root else None

    def get(self, key: str) -> torch.Tensor | None:
        if not self._loc:
            return None
        try:
            blob = self._loc.read_bytes(f"{key}.pt")
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)["weights"]
        except FileNotFoundError:
            return None
        except Exception as e:  # a damaged entry is recomputed, never trusted
            log.warning("classifier cache entry %s unreadable (%s); recomputing", key[:12], e)
            return None

    def put(self, key: str, weights: torch.Tensor) -> None:
        if not self._loc:
            return
        buf = io.BytesIO()
        torch.save({"weights": weights.cpu(), "format": CACHE_FORMAT}, buf)
        self._loc.write_bytes(f"{key}.pt", buf.getvalue())


class ClassificationMetrics:
    """Accumulates top-1, top-5 and per-class recall from batches of logits."""

    def __init__(self, num_classes: int):
        self.k = min(5, num_classes)
        self.hits = torch.zeros(num_classes, dtype=torch.long)
        self.counts = torch.zeros(num_classes, dtype=torch.long)
        self.top5 = 0
        self.n = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns each image's top-1 correctness (bool), as counted here."""
        logits, labels = logits.float().cpu(), labels.cpu()
        topk = logits.topk(self.k, dim=1).indices
        correct = topk == labels[:, None]
        self.top5 += int(correct.any(dim=1).sum())
        self.n += len(labels)
        self.counts += torch.bincount(labels, minlength=len(self.counts))
        self.hits += torch.bincount(labels[correct[:, 0]], minlength=len(self.counts))
        return correct[:, 0]

    def result(self) -> dict:
        present = self.counts > 0
        recall = (self.hits[present].double() / self.counts[present].double()).mean().item()
        return {"top1": int(self.hits.sum()) / self.n, "top5": self.top5 / self.n, "mean_per_class_recall": recall}
