"""Evaluating (model, dataset) pairs into the results table: one pair (`evaluate_pair`), or every
model on every set (`evaluate_many`), each pair's Outcome as it finishes.

Every finished evaluation is appended to the results table at once (its own parquet part), so a
crash or kill loses only the evaluation in flight, and a rerun skips pairs whose row already exists
with the same eval settings and the same data (`previous_row`, the one definition of "already
evaluated"; force evaluates again). The evaluations themselves: cloob.evaluate.runner.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from cloob.errors import CloobError
from cloob.evaluate.datasets import ClassificationSet, RetrievalSet
from cloob.evaluate.models import EvalModel
from cloob.evaluate.runner import EvalSettings, evaluate_retrieval, evaluate_zeroshot, settings_json
from cloob.evaluate.zeroshot import ClassifierCache


@dataclass
class Outcome:
    model: str
    dataset: str
    row: dict | None = None
    reused: bool = False
    error: str | None = None
    extra: dict = field(default_factory=dict)


def read_done(results: str) -> dict[tuple[str, str], dict]:
    """The newest row of every (checkpoint id, dataset) pair in the results table."""
    from cloob.results.table import read_rows

    return {(r["checkpoint_id"], r["dataset"]): r for r in read_rows(results, latest=True).to_pylist()}


def previous_row(done: dict, identity: dict, dataset, settings_hash: str) -> dict | None:
    """The row that makes evaluating this pair again unnecessary: the same checkpoint (and run), the
    same data and the same number-changing settings. The one definition of "already evaluated"."""
    prev = done.get((identity["checkpoint_id"], dataset.name))
    if (prev and prev["eval_settings_hash"] == settings_hash and prev["dataset_hash"] == dataset.identity
            and prev["run_id"] == identity["run_id"]):
        return prev
    return None


def finished_row(model: str, dataset: ClassificationSet | RetrievalSet, settings: EvalSettings,
                 results: str) -> dict | None:
    """The row that makes evaluating this pair unnecessary (previous_row's rule), found without
    loading the model and without choosing a device here: with device "auto" a row made on a GPU or
    on a CPU counts (each under its own settings hash). So a planner on a CPU machine can tell which
    pairs a GPU worker still has to evaluate, and find the row that worker wrote. None for weights
    files (their id is known only once read) and for pairs not evaluated yet."""
    identity = _identity(model)
    if identity is None:
        return None
    task = "retrieval" if isinstance(dataset, RetrievalSet) else "zeroshot"
    devices = ["cuda", "cpu"] if settings.device == "auto" else [settings.device]
    done = read_done(results)
    for device in devices:
        _, settings_hash = settings_json(settings, torch.device(device), {"task": task})
        if prev := previous_row(done, identity, dataset, settings_hash):
            return prev
    return None


def _identity(model: str | EvalModel) -> dict | None:
    """checkpoint_id and run_id without loading the model, where that is cheap (our checkpoints: from
    meta.json); None for weights files, whose id is the file's hash."""
    if isinstance(model, EvalModel):
        return model.info
    from cloob.evaluate.models import parse_external

    if parse_external(model):
        return None

    from cloob.registry.lineage import resolve_checkpoint
    from cloob.train.checkpoint import CheckpointRef

    url = resolve_checkpoint(model)
    meta = CheckpointRef(url, 0).meta()
    return {"checkpoint_id": meta.get("model_sha256"),
            "run_id": meta.get("run_name") or posixpath.basename(posixpath.dirname(posixpath.dirname(url)))}


def evaluate_pair(model: str | EvalModel, dataset: ClassificationSet | RetrievalSet, settings: EvalSettings, *,
                  results: str, cache: ClassifierCache | None = None, done: dict | None = None,
                  force: bool = False, progress: bool = True, pretraining: str | None = None) -> Outcome:
    """One model (a reference, or one already loaded) on one set -> its row, appended to the results
    table at once; or the row already there for the same inputs (reused, unless force). Errors of
    this pair come back in the Outcome; the caller decides whether the others go on."""
    from cloob.evaluate.claim import claim_pair, pair_key
    from cloob.evaluate.models import load_model
    from cloob.results.outcomes import write as write_outcomes
    from cloob.results.table import append_rows

    label = model if isinstance(model, str) else model.info.get("checkpoint_uri", "?")
    device = settings.torch_device()
    task = "retrieval" if isinstance(dataset, RetrievalSet) else "zeroshot"
    _, settings_hash = settings_json(settings, device, {"task": task})
    em = model if isinstance(model, EvalModel) else None
    try:
        identity = _identity(model)
        if identity is None:  # a weights file: its id is known once it is read
            em = load_model(model, device=device, pretraining=pretraining)
            identity = em.info
        if not force:
            done = read_done(results) if done is None else done
            if prev := previous_row(done, identity, dataset, settings_hash):
                return Outcome(label, dataset.name, row=prev, reused=True)
    except (CloobError, OSError) as e:
        return _failed(label, dataset, e)
    # Claimed, and the results read again: another evaluation of the pair may have looked at the
    # same time as this one, and written its row since (cloob.evaluate.claim).
    with claim_pair(results, pair_key(identity, dataset.name, dataset.identity, settings_hash),
                    f"{label} on {dataset.name}"):
        try:
            if not force and (prev := previous_row(read_done(results), identity, dataset, settings_hash)):
                return Outcome(label, dataset.name, row=prev, reused=True)
            if em is None:
                em = load_model(model, device=device, pretraining=pretraining)
            if task == "retrieval":
                row, extra = evaluate_retrieval(em, dataset, settings, progress), {}
            else:
                row = evaluate_zeroshot(em, dataset, settings, cache, progress)
                extra = {"classifier_cached": row.pop("classifier_cached")}
        except (CloobError, OSError) as e:
            return _failed(label, dataset, e)
        # The per-image outcomes first, then the row: a row in the table has its outcomes.
        per_image = row.pop("outcomes")
        write_outcomes(results, row, per_image["ids"], per_image["labels"], per_image["correct"])
        append_rows(results, [row])
    _track(row)
    return Outcome(label, dataset.name, row=row, extra=extra)


def _track(row: dict) -> None:
    """A new row's numbers into the tracking backends of the run whose checkpoint it evaluated, at the
    checkpoint's step (cloob.train.tracking.log_evaluation: never raises). Weights files and imported
    checkpoints have no step and no run folder to add to."""
    if row.get("step") is None:
        return
    from cloob.train.tracking import eval_scalars, log_evaluation

    run_dir = posixpath.dirname(posixpath.dirname(row["checkpoint_uri"]))  # <run>/checkpoints/<step>
    log_evaluation(run_dir, int(row["step"]), row["run_id"], eval_scalars(row))


def _failed(label: str, dataset, e: Exception) -> Outcome:
    if isinstance(e, CloobError):
        return Outcome(label, dataset.name, error=str(e))
    # storage or network failed mid-read: the other pairs still run
    return Outcome(label, dataset.name, error=f"cannot read {dataset.uri}: {type(e).__name__}: {e}\n  fix: check "
                                              "the path, network and credentials; rerun to evaluate what is missing")


def evaluate_many(models: list[str], classification: list[tuple[str, str]], retrieval: list[tuple[str, str]],
                  *, results: str, cache_root: str | None, settings: EvalSettings, force: bool = False,
                  pretraining: str | None = None, progress: bool = True) -> Iterator[Outcome]:
    """Every model on every set; yields an Outcome per pair as it finishes. Bad sets and models are
    reported per pair, and the others go on. classification: (spec name or path, uri) pairs."""
    from cloob.evaluate.datasets import open_classification_set, open_retrieval_set
    from cloob.evaluate.models import load_model

    device = settings.torch_device()
    sets: list = []
    for spec, uri in classification:
        try:
            sets.append(open_classification_set(spec, uri))
        except CloobError as e:
            yield Outcome("*", str(spec), error=str(e))
    for name, uri in retrieval:
        try:
            sets.append(open_retrieval_set(uri, name))
        except CloobError as e:
            yield Outcome("*", name, error=str(e))
    if not sets:
        return
    done = {} if force else read_done(results)
    cache = ClassifierCache(cache_root)
    for ref in models:
        try:
            em = load_model(ref, device=device, pretraining=pretraining)
        except CloobError as e:
            yield Outcome(ref, "*", error=str(e))
            continue
        for s in sets:
            o = evaluate_pair(em, s, settings, results=results, cache=cache, done=done, force=force,
                              progress=progress)
            o.model = ref
            yield o
