"""Prefect flows over cloob: prepare_data, prepare_downstream, train, register, evaluate; the flows
pipeline (all of it), cloob-train (one run, for a GPU work pool) and evaluate-checkpoints.

Thin by design: every task calls one cloob function and passes URIs and hashes on, never data.
Skipping is keyed on content through cloob.run.state: each task first asks whether its output is there
and was made from these very inputs (spec, manifest, recipe and checkpoint hashes) and returns it if
so. A finished pipeline re-runs in seconds; a re-run after a crash does only what is missing
(training resumes from its last checkpoint). Prefect's own result cache is not used for this: its key
is fixed before the task runs, so it cannot tell "not made yet" from "made, then deleted".
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import wait

# ------------------------------------------------------------------------------------------- data

def _skip(what: str, key: str) -> None:
    get_run_logger().info("%s: already done (content key %s), skipped", what, key[:12])


@task(name="prepare_data")
def prepare_data(spec: str, out: str, input: str | None = None, overrides: list[str] | None = None) -> dict:
    """One pretraining dataset into webdataset shards (img2dataset runs in its own process)."""
    from cloob.data.prepare import prepare, read_manifest
    from cloob.data.spec import load_spec
    from cloob.run.state import prepared

    s = load_spec(spec, list(overrides or []))
    if key := prepared(s, out):
        _skip(f"prepare {s.name}", key)
        m = read_manifest(out)
    else:
        m = prepare(s, out, input=input, progress=False)
        get_run_logger().info("%s: %d images in %d shards at %s", m["name"], m["totals"]["successes"],
                              m["totals"]["shards"], out)
    return {"uri": out, "content_hash": m["content_hash"], "images": m["totals"]["successes"]}


@task(name="prepare_downstream", task_run_name="prepare_downstream-{name}")
def prepare_downstream_set(name: str, out: str, source: str | None = None) -> dict:
    from cloob.data.downstream.prepare import prepare_downstream

    # prepare_downstream itself returns at once when the manifest matches the spec and the source.
    return prepare_downstream(name, out, source=source, progress=False)


# ---------------------------------------------------------------------------------------- training

def _checkpoint_summary(run_dir: str, checkpoint: str) -> dict:
    from cloob.registry.lineage import read_json

    meta = read_json(posixpath.join(checkpoint, "meta.json")) or {}
    return {"run_dir": run_dir, "checkpoint": checkpoint, "sha256": meta.get("model_sha256"),
            "step": meta.get("step"), "method": meta.get("method")}


def _trained_summary(r) -> dict | None:
    """The finished run of recipe `r` (content-keyed, see cloob.run.state), or None."""
    from cloob.run.state import trained
    from cloob.train.checkpoint import CheckpointStore

    if key := trained(r):
        _skip(f"train {r.name} ({r.loss.method})", key)
        return _checkpoint_summary(r.run_dir(), CheckpointStore(r.run_dir()).latest().url)
    return None


@task(name="train")
def train(recipe: str, overrides: list[str], nproc_per_node: int = 1, deadline_s: float | None = None,
          nnodes: int = 1, rdzv_endpoint: str | None = None) -> dict:
    """torchrun as a supervised subprocess tree; its output goes to this task's log, its progress to
    an artifact; the deadline, a cancel or a crash here stop every process of it."""
    from cloob.config import load_recipe
    from cloob.run.launch import launch

    r = load_recipe(recipe, list(overrides))
    if done := _trained_summary(r):
        return done
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description=f"training {recipe} ({r.loss.method})")
    last = {"artifact": 0.0, "log": time.monotonic()}

    def on_progress(p: dict) -> None:
        total = p.get("total_steps") or 0
        now = time.monotonic()
        loss = p.get("loss")
        text = (f"step {p['step']}/{total or '?'}, loss {'-' if loss is None else f'{loss:.4f}'}, "
                f"{p.get('samples_per_s') or 0:.0f} samples/s")
        if total and now - last["artifact"] > 2:
            last["artifact"] = now
            update_progress_artifact(artifact, 100.0 * p["step"] / total, description=text)
        if now - last["log"] > 15 or p["step"] == total:  # the trainer prints no per-step lines here
            last["log"] = now
            logger.info(text)

    result = launch(recipe, list(overrides), nproc_per_node=nproc_per_node, nnodes=nnodes,
                    rdzv_endpoint=rdzv_endpoint or os.environ.get("CLOOB_RDZV_ENDPOINT"), deadline_s=deadline_s,
                    on_line=lambda line: logger.info(line.rstrip()), on_progress=on_progress)
    result.check()
    update_progress_artifact(artifact, 100.0, description=f"done: {result.checkpoint}")
    return _checkpoint_summary(result.run_dir, result.checkpoint)


@task(name="train-on-deployment", task_run_name="train-on-{deployment}")
def train_remote(deployment: str, recipe: str, overrides: list[str], nproc_per_node: int = 1,
                 deadline_s: float | None = None) -> dict:
    """Training as a run of the `cloob-train` deployment (a GPU work pool), waited for here. Its
    result is read back from the store by content, as for a finished local run, so the two flows
    share no result storage, only the store."""
    from prefect.deployments import run_deployment

    from cloob.config import load_recipe
    from cloob.errors import CloobError

    r = load_recipe(recipe, list(overrides))
    if done := _trained_summary(r):
        return done
    run = run_deployment(deployment, parameters={"recipe": recipe, "overrides": list(overrides),
                                                 "nproc_per_node": nproc_per_node, "deadline_s": deadline_s},
                         timeout=None, as_subflow=True)
    if not run.state or not run.state.is_completed():
        raise CloobError(f"training run {run.name} on deployment {deployment} ended {run.state.name if run.state else 'unknown'}"
                         f": {run.state.message if run.state else ''}",
                         "see that flow run's log in the Prefect UI; rerunning the pipeline resumes the training")
    if done := _trained_summary(r):
        return done
    raise CloobError(f"training run {run.name} on deployment {deployment} completed, but the store has no "
                     f"finished checkpoint of {recipe} {' '.join(overrides)}",
                     "the deployment's worker must see the same store (train.output) as this flow: "
                     "use a shared bucket, not a local folder")


@task(name="register")
def register(checkpoint: str, registry: str) -> str:
    from cloob.registry import Registry

    return Registry(registry).register(checkpoint)["id"]  # registering again changes nothing


# -------------------------------------------------------------------------------------- evaluation

_SUMMARY = ("run_id", "checkpoint_id", "dataset", "main_metric", "main_value", "n_images", "n_skipped")


@task(name="evaluate", task_run_name="evaluate-{dataset}")
def evaluate(checkpoint: str, dataset: str, dataset_uri: str, results: str, cache_root: str | None = None,
             settings: dict | None = None) -> dict:
    """One checkpoint on one zero-shot set -> one row appended to the results table (the runner's own
    per-pair function: the same skip rule as `cloob evaluate`)."""
    from cloob.errors import CloobError
    from cloob.evaluate.datasets import open_classification_set
    from cloob.evaluate.runner import EvalSettings, evaluate_pair
    from cloob.evaluate.zeroshot import ClassifierCache

    ds = open_classification_set(dataset, dataset_uri)
    o = evaluate_pair(checkpoint, ds, EvalSettings(**(settings or {})), results=results,
                      cache=ClassifierCache(cache_root), progress=False)
    if o.error:
        raise CloobError(o.error)
    row = o.row
    if o.reused:
        _skip(f"evaluate {ds.name}", row["row_uuid"])
    else:
        get_run_logger().info("%s on %s: %s %.4f (%d images, %d skipped)", row["run_id"], ds.name,
                              row["main_metric"], row["main_value"], row["n_images"], row["n_skipped"])
    return {k: row[k] for k in _SUMMARY}


@task(name="publish_results")
def publish_results(results: str) -> str:
    """The results table as a table artifact and the side-by-side report as a markdown artifact."""
    from cloob.results.arrange import build_report
    from cloob.results.render import render_markdown
    from cloob.results.report import write_report
    from cloob.results.table import read_rows

    rows = read_rows(results, latest=True).to_pylist()
    cols = ("run_id", "step", "method", "arch", "dataset", "main_metric", "main_value", "top1", "top5",
            "n_images", "n_skipped")
    create_table_artifact([{k: r.get(k) for k in cols} for r in rows], key="cloob-results",
                          description=f"results table at {results}")
    report = build_report(results)
    create_markdown_artifact(render_markdown(report), key="cloob-report", description="cloob results")
    return write_report(report, posixpath.join(results, "report"))["markdown"]


# ------------------------------------------------------------------------------------------- flows

@flow(name="evaluate-checkpoints")
def evaluate_flow(checkpoints: list[str], datasets: dict[str, str], store: str, settings: dict | None = None) -> dict:
    """Every checkpoint on every set, one task each; a failing set fails only its own tasks."""
    results = posixpath.join(store, "results")
    cache_root = posixpath.join(store, "cache", "classifiers")
    futures = [evaluate.submit(c, name, uri, results, cache_root, settings)
               for c in checkpoints for name, uri in datasets.items()]
    wait(futures)
    failed = [f for f in futures if f.state.is_failed()]
    for f in failed:
        get_run_logger().error("evaluation failed: %s", f.state.message)
    report = publish_results(results)
    return {"results": results, "report": report, "evaluated": len(futures) - len(failed), "failed": len(failed)}


@flow(name="cloob-train")
def train_flow(recipe: str, overrides: list[str], nproc_per_node: int = 1, nnodes: int = 1,
               rdzv_endpoint: str | None = None, deadline_s: float | None = None) -> dict:
    """One training run, as its own flow: what the GPU work pool runs. With nnodes > 1 this is node 0;
    the other nodes join at rdzv_endpoint (default: $CLOOB_RDZV_ENDPOINT, set by the Kubernetes job
    template) with the same recipe and overrides."""
    return train(recipe, overrides, nproc_per_node, deadline_s, nnodes, rdzv_endpoint)


@flow(name="cloob-pipeline")
def pipeline(store: str, specs: list[str], recipes: list[str], downstream: list[str],
             overrides: list[str] | None = None, spec_overrides: list[str] | None = None,
             nproc_per_node: int = 1, train_deadline_s: float | None = None,
             eval_settings: dict | None = None, train_deployment: str | None = None) -> dict[str, Any]:
    """specs -> shards -> one run per recipe on the first spec's data -> registry -> zero-shot
    evaluation of every run on every downstream set -> results table and report.

    train_deployment: e.g. "cloob-train/gpu": train there (a GPU work pool) instead of in this
    flow's process; everything else stays here (the CPU pool)."""
    from flows.signals import stop_on_signals

    with stop_on_signals("cloob-pipeline"):
        data = [prepare_data(spec, posixpath.join(store, "datasets", posixpath.splitext(posixpath.basename(spec))[0]),
                             None, spec_overrides) for spec in specs]
        train_data = ",".join(d["uri"] for d in data[:1])
        # A recipe entry is a name or path, optionally with its own overrides: "tiny loss.method=clip".
        runs = []
        for entry in recipes:
            name, *own = entry.split()
            run_overrides = [f"data.train={train_data}", f"train.output={store}", *(overrides or []), *own]
            if train_deployment:
                runs.append(train_remote(train_deployment, name, run_overrides, nproc_per_node, train_deadline_s))
            else:
                runs.append(train(name, run_overrides, nproc_per_node, train_deadline_s))
        registry = posixpath.join(store, "registry")
        for r in runs:
            register(r["checkpoint"], registry)
        sets = prepare_downstream_set.map(downstream, unmapped(posixpath.join(store, "downstream")))
        datasets = {s["name"]: s["uri"] for s in [f.result() for f in sets]}
        out = evaluate_flow([r["checkpoint"] for r in runs], datasets, store, eval_settings)
        from cloob.registry import Registry

        Registry(registry).update_best(out["results"])
        return {**out, "runs": runs, "datasets": datasets}
