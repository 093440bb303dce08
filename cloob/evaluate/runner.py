"""One evaluation = one (model, dataset) pair -> one results-table row: the settings (`EvalSettings`),
zero-shot classification (`evaluate_zeroshot`) and retrieval (`evaluate_retrieval`). Which pairs to
run, the rows already there, and the loop over many: cloob.evaluate.pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import torch

from cloob.errors import CloobError
from cloob.evaluate import diagnostics as diag
from cloob.evaluate.datasets import ClassificationSet, RetrievalSet, classification_data, image_names, loader, retrieval_data
from cloob.evaluate.models import EvalModel
from cloob.evaluate.retrieval import recall_and_first_hits
from cloob.evaluate.zeroshot import ClassificationMetrics, ClassifierCache, build_classifier, classifier_key
from cloob.results.outcomes import image_ids

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    batch_size: int = 64
    workers: int | None = None  # DataLoader workers; None: one per core but one, at most 8
    precision: Literal["auto", "fp32", "amp"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: str = "auto"
    limit: int | None = None  # at most this many images per set (a seeded random subset of folders)
    diag_samples: int = 2000  # embeddings used for the diagnostics (pairwise cost grows as n^2)
    seed: int = 0
    # CPU threads of the model in this process (None: torch's default, one per core). With a small
    # model the images are the work: give the cores to the decoding workers (threads=1, bench_eval).
    threads: int | None = None
    # The longest wait for one batch from the DataLoader workers (their start-up included): past it
    # the evaluation fails with one error instead of hanging on a stuck worker or a silent store.
    loader_timeout_s: float = 600.0

    def __post_init__(self):
        if self.batch_size < 1:
            raise CloobError(f"batch size {self.batch_size} must be at least 1", "use --batch-size 64")
        if self.workers is None:
            # The model needs the cores too: on 2 cores one decoding worker is fastest (bench_eval).
            self.workers = max(0, min(8, (os.cpu_count() or 1) - 1))
        if self.workers < 0:
            raise CloobError(f"workers {self.workers} must be 0 or more", "use --workers 2 (0: load in this process)")
        if self.limit is not None and self.limit < 1:
            raise CloobError(f"limit {self.limit} must be at least 1", "leave --limit out to use every image")
        if self.diag_samples < 2:
            raise CloobError(f"diag samples {self.diag_samples} must be at least 2", "use --diag-samples 2000")
        if self.threads is not None and self.threads < 1:
            raise CloobError(f"threads {self.threads} must be at least 1", "leave --threads out for torch's default")
        if self.loader_timeout_s <= 0:
            raise CloobError(f"loader timeout {self.loader_timeout_s} s must be positive", "use 600 (seconds)")
        if self.precision not in ("auto", "fp32", "amp"):
            raise CloobError(f"precision {self.precision!r} is not auto, fp32 or amp", "use --precision auto")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise CloobError(f"device {self.device} asked for, but CUDA is not available here",
                             "use --device cpu (or auto)")
        return torch.device(self.device)

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision == "auto":
            return "amp" if device.type == "cuda" else "fp32"
        return self.precision

    def numbers_key(self, device: torch.device) -> dict:
        """The settings that can change the numbers (not batch size, workers or the GPU model)."""
        return {"precision": self.resolved_precision(device), "device_type": device.type, "limit": self.limit,
                "diag_samples": self.diag_samples, "seed": self.seed}


def settings_json(settings: EvalSettings, device: torch.device, extra: dict) -> tuple[str, str]:
    blob = json.dumps({**settings.numbers_key(device), **extra}, sort_keys=True, separators=(",", ":"))
    return blob, hashlib.sha256(blob.encode()).hexdigest()


def _autocast(device: torch.device, precision: str):
    if precision == "amp" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


class _DiagSample:
    """Keeps the `size` items with the smallest seeded hash of their index: a uniform random subset
    that does not depend on the order batches arrive in (workers interleave shards)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.keys = np.empty(0, dtype=np.uint64)
        self.rows: torch.Tensor | None = None
        self.extra: list = []

    def _hash(self, idx: list[int]) -> np.ndarray:
        # splitmix64 of (index + seed): vectorised, and uint64 arithmetic wraps as intended.
        z = np.asarray(idx, dtype=np.uint64) + np.uint64((self.seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    def add(self, index: list[int], emb: torch.Tensor, extra: list) -> None:
        keys = np.concatenate([self.keys, self._hash(index)])
        rows = emb.cpu() if self.rows is None else torch.cat([self.rows, emb.cpu()])
        extra = self.extra + list(extra)
        if len(keys) > self.size:
            keep = np.argsort(keys, kind="stable")[: self.size]
            keys, rows, extra = keys[keep], rows[torch.from_numpy(keep)], [extra[i] for i in keep.tolist()]
        self.keys, self.rows, self.extra = keys, rows, extra

    def tensor(self) -> torch.Tensor:
        return self.rows


@contextmanager
def _threads(settings: EvalSettings, device: torch.device):
    if settings.threads is None or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bar(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def _now() -> datetime:
    return datetime.now(UTC)


def _device_name(device: torch.device) -> str:
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def _base_row(em: EvalModel, dataset: str, uri: str, identity: str, task: str) -> dict:
    from cloob.storage import redact as _redact
    from cloob.version import code_version

    return {**em.info, "dataset": dataset, "dataset_uri": _redact(uri), "dataset_hash": identity, "task": task,
            "code_version": code_version(), "row_uuid": uuid.uuid4().hex}


def evaluate_zeroshot(em: EvalModel, ds: ClassificationSet, settings: EvalSettings,
                      cache: ClassifierCache | None = None, progress: bool = True) -> dict:
    """Zero-shot classification of `ds` with `em`: a results row (plus `classifier_cached`)."""
    with _threads(settings, settings.torch_device()), torch.no_grad():
        return _zeroshot(em, ds, settings, cache, progress)


def _zeroshot(em: EvalModel, ds: ClassificationSet, settings: EvalSettings, cache: ClassifierCache | None,
              progress: bool) -> dict:
    started, t0 = _now(), time.perf_counter()
    device = settings.torch_device()
    precision = settings.resolved_precision(device)
    autocast = _autocast(device, precision)
    model = em.model.to(device).eval()
    spec = ds.spec
    cache = cache or ClassifierCache(None)
    key = classifier_key(em.info["checkpoint_id"], em.info["arch"], spec.class_names, spec.templates, precision)
    weights = cache.get(key)
    cached = weights is not None
    if weights is None:
        weights = build_classifier(model, em.tokenizer, spec.class_names, spec.templates, device, autocast)
        cache.put(key, weights)
    weights = weights.to(device)
    n_classes = len(spec.class_names)

    data, total = classification_data(ds, em.preprocess, settings.limit, settings.seed)
    metrics = ClassificationMetrics(n_classes)
    sample = _DiagSample(settings.diag_samples, settings.seed)
    per_image: dict[str, list] = {"index": [], "labels": [], "correct": []}
    skipped = seen = 0
    with _bar(total if total is not None else settings.limit, f"{em.info['run_id'][:24]} {ds.name}", progress) as bar:
        for batch in loader(data, settings.batch_size, settings.workers, settings.loader_timeout_s,
                            f"{ds.name} ({ds.uri})"):
            skipped += len(batch["bad"])
            seen += len(batch["bad"]) + len(batch["targets"])
            bar.update(len(batch["bad"]) + len(batch["targets"]))
            if batch["images"] is not None:
                labels = torch.tensor(batch["targets"], dtype=torch.long)
                unlabelled = labels < 0
                if (labels >= n_classes).any():
                    bad = sorted(set(labels[labels >= n_classes].tolist()))[:5]
                    raise CloobError(f"{ds.name}: {ds.uri} has class index {bad} but the spec has {n_classes} "
                                     f"classes (0..{n_classes - 1})",
                                     "check that the shards were written for this spec's class order")
                skipped += int(unlabelled.sum())
                keep = ~unlabelled
                if keep.any():
                    with autocast():
                        emb = model.encode_image(batch["images"][keep].to(device, non_blocking=True))
                    emb = torch.nn.functional.normalize(emb.float(), dim=-1)
                    # Per image, for paired comparisons (cloob/results/outcomes.py): the top-1 counted.
                    correct = metrics.update(emb @ weights, labels[keep])
                    idx = [i for i, k in zip(batch["index"], keep.tolist()) if k]
                    per_image["index"] += idx
                    per_image["labels"] += labels[keep].tolist()
                    per_image["correct"] += correct.tolist()
                    sample.add(idx, emb, labels[keep].tolist())
            if settings.limit is not None and total is None and seen >= settings.limit:
                break
    if metrics.n == 0:
        raise CloobError(f"{ds.name}: no readable image in {ds.uri} ({skipped} unreadable or unlabelled)",
                         "the eval set is empty or damaged: prepare it again (cloob prepare-downstream --force)")
    result = metrics.result()
    class_emb = weights.T.float().cpu()
    img = sample.tensor()
    d = diag.diagnostics(img, class_emb, class_emb[torch.tensor(sample.extra)])
    settings_blob, settings_hash = settings_json(settings, device, {"task": "zeroshot"})
    row = {**_base_row(em, ds.name, ds.uri, ds.identity, "zeroshot"), **result, **d,
           "n_images": metrics.n, "n_skipped": skipped, "n_classes": n_classes,
           "dataset_warnings": "; ".join(ds.warnings) or None,
           "main_metric": spec.main_metric, "main_value": result[spec.main_metric],
           "eval_settings": settings_blob, "eval_settings_hash": settings_hash, "device": _device_name(device),
           "seconds": time.perf_counter() - t0, "started_at": started, "finished_at": _now()}
    outcomes = {"ids": image_ids(image_names(data, ds.uri, ds.shards, per_image["index"])),
                "labels": per_image["labels"], "correct": per_image["correct"]}
    return {**row, "classifier_cached": cached, "outcomes": outcomes}


def evaluate_retrieval(em: EvalModel, rs: RetrievalSet, settings: EvalSettings, progress: bool = True) -> dict:
    """Image<->text recall@1/5/10 on the captioned pairs of `rs`, plus diagnostics on the pairs."""
    with _threads(settings, settings.torch_device()), torch.no_grad():
        return _retrieval(em, rs, settings, progress)


def _retrieval(em: EvalModel, rs: RetrievalSet, settings: EvalSettings, progress: bool) -> dict:
    started, t0 = _now(), time.perf_counter()
    device = settings.torch_device()
    autocast = _autocast(device, settings.resolved_precision(device))
    model = em.model.to(device).eval()
    images, captions, index = [], [], []
    skipped = 0
    with _bar(settings.limit, f"{em.info['run_id'][:24]} {rs.name}", progress) as bar:
        for batch in loader(retrieval_data(rs, em.preprocess), settings.batch_size, settings.workers,
                            settings.loader_timeout_s, f"{rs.name} ({rs.uri})"):
            skipped += len(batch["bad"])
            bar.update(len(batch["bad"]) + len(batch["targets"]))
            if batch["images"] is None:
                continue
            keep = [bool(c) for c in batch["targets"]]
            skipped += keep.count(False)
            if any(keep):
                with autocast():
                    emb = model.encode_image(batch["images"][torch.tensor(keep)].to(device))
                images.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
                captions += [c for c, k in zip(batch["targets"], keep) if k]
                index += [i for i, k in zip(batch["index"], keep) if k]
            if settings.limit is not None and len(captions) + skipped >= settings.limit:
                break
    if settings.limit is not None:
        captions, index = captions[: settings.limit], index[: settings.limit]
    if len(captions) < 2:
        raise CloobError(f"{rs.name}: {len(captions)} readable captioned image(s) in {rs.uri} "
                         f"({skipped} unreadable or without caption)",
                         "a retrieval set needs webdataset shards with an image and a `txt` caption per sample")
    img = torch.cat(images)[: len(captions)]
    txt = []
    for s in range(0, len(captions), 512):
        tokens = em.tokenizer(captions[s:s + 512]).to(device)
        with autocast():
            t = model.encode_text(tokens)
        txt.append(torch.nn.functional.normalize(t.float(), dim=-1).cpu())
    txt = torch.cat(txt)
    result, first_hit = recall_and_first_hits(img, txt, captions)
    sample = _DiagSample(settings.diag_samples, settings.seed)
    sample.add(index, torch.cat([img, txt], dim=1), list(range(len(index))))
    both = sample.tensor()
    d = diag.diagnostics(both[:, : img.shape[1]], both[:, img.shape[1]:], both[:, img.shape[1]:])
    settings_blob, settings_hash = settings_json(settings, device, {"task": "retrieval"})
    return {**_base_row(em, rs.name, rs.uri, rs.identity, "retrieval"), **result, **d,
            "n_images": len(captions), "n_skipped": skipped, "n_classes": None,
            "main_metric": "i2t_r1", "main_value": result["i2t_r1"],
            "eval_settings": settings_blob, "eval_settings_hash": settings_hash, "device": _device_name(device),
            "seconds": time.perf_counter() - t0, "started_at": started, "finished_at": _now(),
            "outcomes": {"ids": image_ids(image_names(None, rs.uri, rs.shards, index)),
                         "labels": [-1] * len(captions), "correct": first_hit}}
