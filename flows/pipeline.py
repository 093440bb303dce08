"""Prefect flows over cloob: prepare_data, prepare_downstream, train, register, evaluate (here, or as
deployment runs on a GPU pool); the flows pipeline (all of it), cloob-train (one run, for a GPU work
pool) and evaluate-checkpoints.

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
import re
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
def prepare_data(spec: str, out: str, input: str | None = None, overrides: list[str] | None = None,
                 spark_master: str | None = None, ray_address: str | None = None) -> dict:
    """One pretraining dataset into webdataset shards (img2dataset runs in its own process; under
    download.distributor pyspark or ray, on the cluster `spark_master` / `ray_address` names)."""
    from cloob.data.prepare import prepare, read_manifest
    from cloob.data.spec import load_spec
    from cloob.run.state import prepared

    s = load_spec(spec, list(overrides or []))
    if key := prepared(s, out):
        _skip(f"prepare {s.name}", key)
        m = read_manifest(out)
    else:
        m = prepare(s, out, input=input, progress=False, spark_master=spark_master, ray_address=ray_address)
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
    # Keyed by the run, so that the Artifacts page finds each run's progress (artifact keys are
    # lowercase letters, digits and dashes).
    key = "train-" + re.sub(r"[^a-z0-9-]+", "-", r.run_id().lower()).strip("-")
    artifact = create_progress_artifact(0.0, key=key, description=f"training {recipe} ({r.loss.method})")
    last = {"artifact": 0.0, "log": time.monotonic(), "text": ""}

    def on_progress(p: dict) -> None:
        total = p.get("total_steps") or 0
        now = time.monotonic()
        loss = p.get("loss")
        text = (f"step {p['step']}/{total or '?'}, loss {'-' if loss is None else f'{loss:.4f}'}, "
                f"{p.get('samples_per_s') or 0:.0f} samples/s")
        last["text"] = text
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
    update_progress_artifact(artifact, 100.0, description=f"done: {last['text'] or 'no step reported'}; "
                                                          f"checkpoint {result.checkpoint}")
    return _checkpoint_summary(result.run_dir, result.checkpoint)


def _ended(run) -> str:
    """A deployment run's final state and the problem it reported, without the nested `fix:` lines of
    its own error (the caller gives the fix that applies from here)."""
    if not run.state:
        return "in an unknown state"
    problem = " ".join(line.strip() for line in (run.state.message or "").splitlines() if
                       not line.strip().startswith("fix:"))
    return f"{run.state.name}: {problem}" if problem else run.state.name


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
        raise CloobError(f"training run {run.name} on deployment {deployment} ended {_ended(run)}",
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


def _percent(v: float | None) -> str | None:
    return None if v is None or v != v else f"{100 * v:.1f}%"  # v != v: NaN


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
    # Metrics are fractions in the table; people read percentages, rounded as the printed table is.
    shown = [{k: _percent(r.get(k)) if k in ("main_value", "top1", "top5") else r.get(k) for k in cols} for r in rows]
    create_table_artifact(shown, key="cloob-results", description=f"results table at {results} (accuracies in percent)")
    report = build_report(results)
    create_markdown_artifact(render_markdown(report), key="cloob-report", description="cloob results")
    return write_report(report, posixpath.join(results, "report"))["markdown"]


# How often a waiting task asks the server whether its deployment run has ended (run_deployment's
# default is 5 s; an evaluation of a small set takes about that long).
DEPLOYMENT_POLL_S = 2.0


@task(name="evaluate-on-deployment", task_run_name="evaluate-{dataset}-on-{deployment}")
def evaluate_remote(deployment: str, checkpoint: str, dataset: str, dataset_uri: str, store: str,
                    settings: dict | None = None, run_name: str | None = None) -> dict:
    """One checkpoint on one set as a run of the evaluate-checkpoints deployment (a GPU work pool),
    waited for here. A pair already in the results table starts no run; the row is read back from
    the table in the store, by content, not from Prefect's results (as train-on-deployment does)."""
    from prefect.deployments import run_deployment

    from cloob.errors import CloobError
    from cloob.evaluate.datasets import open_classification_set
    from cloob.evaluate.runner import EvalSettings, finished_row

    results = posixpath.join(store, "results")
    ds = open_classification_set(dataset, dataset_uri)
    eval_settings = EvalSettings(**(settings or {}))
    if row := finished_row(checkpoint, ds, eval_settings, results):
        _skip(f"evaluate {ds.name}", row["row_uuid"])
        return {k: row[k] for k in _SUMMARY}
    run = run_deployment(deployment, parameters={
        "checkpoints": [checkpoint], "datasets": {dataset: dataset_uri}, "store": store, "settings": settings,
        "publish": False, "raise_on_failure": True}, flow_run_name=run_name, timeout=None,
        poll_interval=DEPLOYMENT_POLL_S, as_subflow=True)
    if not run.state or not run.state.is_completed():
        raise CloobError(f"evaluation run {run.name} on deployment {deployment} ended {_ended(run)}",
                         "see that flow run's log in the Prefect UI; rerunning the pipeline evaluates only the "
                         "pairs that are missing")
    if row := finished_row(checkpoint, ds, eval_settings, results):
        get_run_logger().info("%s on %s: %s %.4f (%d images, %d skipped; run %s)", row["run_id"], ds.name,
                              row["main_metric"], row["main_value"], row["n_images"], row["n_skipped"], run.name)
        return {k: row[k] for k in _SUMMARY}
    raise CloobError(f"evaluation run {run.name} on deployment {deployment} completed, but the results table "
                     f"{results} has no row of {checkpoint} on {ds.name}",
                     "the deployment's worker must see the same store as this flow: use a shared bucket, not a "
                     "local folder")


# ------------------------------------------------------------------------------------------- flows

@flow(name="evaluate-checkpoints")
def evaluate_flow(checkpoints: list[str], datasets: dict[str, str], store: str, settings: dict | None = None,
                  publish: bool = True, raise_on_failure: bool = False) -> dict:
    """Every checkpoint on every set, one task each; a failing set fails only its own tasks.

    The pipeline's fan-out (one run of the evaluate-checkpoints/gpu deployment per checkpoint x set)
    sets publish=False (it publishes once, when every pair is in) and raise_on_failure=True (a failed
    pair is a failed flow run, which the pipeline and the UI see)."""
    results = posixpath.join(store, "results")
    cache_root = posixpath.join(store, "cache", "classifiers")
    futures = [evaluate.submit(c, name, uri, results, cache_root, settings)
               for c in checkpoints for name, uri in datasets.items()]
    wait(futures)
    failed = [f for f in futures if f.state.is_failed()]
    for f in failed:
        get_run_logger().error("evaluation failed: %s", f.state.message)
    if failed and raise_on_failure:
        from cloob.errors import CloobError

        raise CloobError(f"{len(failed)} of {len(futures)} evaluations failed: "
                         + "; ".join(f.state.message or "?" for f in failed),
                         "see this flow run's log; rerunning evaluates only the pairs that are missing")
    report = publish_results(results) if publish else None
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
             eval_settings: dict | None = None, train_deployment: str | None = None,
             eval_deployment: str | None = None, spark_master: str | None = None,
             ray_address: str | None = None) -> dict[str, Any]:
    """specs -> shards -> one run per recipe on the first spec's data -> registry -> zero-shot
    evaluation of every run on every downstream set -> results table and report.

    What does not depend on each other overlaps: the downstream sets are prepared while the data is
    prepared and the first recipe trains; each checkpoint's evaluations start as soon as it is
    registered, while the next recipe trains. The trainings themselves run one after the other.

    train_deployment: e.g. "cloob-train/gpu": train there (a GPU work pool) instead of in this
    flow's process. eval_deployment: e.g. "evaluate-checkpoints/gpu": evaluate there, one run per
    checkpoint x set, instead of in this flow's process. Everything else stays here (the CPU pool).
    spark_master / ray_address: the cluster that prepares the data, for specs whose
    download.distributor is pyspark or ray (a spec override can set it: download.distributor=ray);
    without them, cloob prepare's defaults (an active SparkSession or local[N]; RAY_ADDRESS or a local Ray)."""
    from flows.signals import stop_on_signals

    with stop_on_signals("cloob-pipeline"):
        # Submitted first: they need nothing else, and run in threads while this one trains.
        set_futures = prepare_downstream_set.map(downstream, unmapped(posixpath.join(store, "downstream")))
        data = [prepare_data(spec, posixpath.join(store, "datasets", posixpath.splitext(posixpath.basename(spec))[0]),
                             None, spec_overrides, spark_master, ray_address) for spec in specs]
        train_data = ",".join(d["uri"] for d in data[:1])
        registry = posixpath.join(store, "registry")
        results = posixpath.join(store, "results")
        cache_root = posixpath.join(store, "cache", "classifiers")
        datasets: dict[str, str] | None = None
        runs, evals = [], []
        # A recipe entry is a name or path, optionally with its own overrides: "tiny loss.method=clip".
        for entry in recipes:
            name, *own = entry.split()
            run_overrides = [f"data.train={train_data}", f"train.output={store}", *(overrides or []), *own]
            if train_deployment:
                run = train_remote(train_deployment, name, run_overrides, nproc_per_node, train_deadline_s)
            else:
                run = train(name, run_overrides, nproc_per_node, train_deadline_s)
            runs.append(run)
            register(run["checkpoint"], registry)
            if datasets is None:  # by now the sets have had the data preparation and a training to get ready
                datasets = _prepared_sets(set_futures)
            evals += _submit_evaluations(run, datasets, store, results, cache_root, eval_settings, eval_deployment)
        if datasets is None:  # no recipes
            datasets = _prepared_sets(set_futures)
        wait(evals)
        failed = [f for f in evals if not f.state.is_completed()]
        for f in failed:
            get_run_logger().error("evaluation failed: %s", f.state.message)
        report = publish_results(results)
        from cloob.registry import Registry

        Registry(registry).update_best(results)
        return {"results": results, "report": report, "evaluated": len(evals) - len(failed),
                "failed": len(failed) + len(downstream) - len(datasets), "runs": runs, "datasets": datasets}


def _prepared_sets(futures) -> dict[str, str]:
    """{name: uri} of the downstream sets that were prepared; a set that failed is logged (its
    evaluations are left out and the pipeline counts it failed), the others go on."""
    wait(futures)
    out = {}
    for f in futures:
        if f.state.is_completed():
            s = f.result()
            out[s["name"]] = s["uri"]
        else:
            get_run_logger().error("downstream set not prepared: %s", f.state.message)
    return out


def _submit_evaluations(run: dict, datasets: dict[str, str], store: str, results: str, cache_root: str,
                        settings: dict | None, deployment: str | None) -> list:
    """One task per set for this checkpoint, started now (threads) so they run while the next recipe
    trains. With a deployment, each pair is a run of its own there.

    Per checkpoint x set rather than per checkpoint: the text tower's pass is per set anyway (a
    classifier per checkpoint, classes and templates, cached in the store), so one run per checkpoint
    would save only a model load and a process start per set (seconds, against minutes for a real
    set), while one per pair spreads a checkpoint's sets over every GPU worker, fails only the pair
    that failed, and lets a rerun start runs for exactly the pairs that are missing."""
    if deployment is None:
        return [evaluate.submit(run["checkpoint"], name, uri, results, cache_root, settings)
                for name, uri in datasets.items()]
    run_id = posixpath.basename(run["run_dir"].rstrip("/"))
    return [evaluate_remote.submit(deployment, run["checkpoint"], name, uri, store, settings,
                                   f"evaluate-{run_id}-step{run['step']}-on-{name}")
            for name, uri in datasets.items()]
