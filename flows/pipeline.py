"""The Prefect flows over cloob: the pipeline (all of it), cloob-train (one run, for a GPU work pool)
and evaluate-checkpoints. Their tasks are in flows/tasks.py.

A finished pipeline re-runs in seconds, its tasks ending Skipped (content-keyed, see flows/tasks.py);
a re-run after a crash does only what is missing (training resumes from its last checkpoint).
"""

from __future__ import annotations

import posixpath
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.futures import wait

from flows.names import summary_label
from flows.outage import engine_retries
from flows.promote import promote_models
from flows.remote import RETRIES, WORKER_WAIT_S
from flows.summary import name_run, publish_summary
from flows.tasks import (
    dataset_folder,
    evaluate,
    evaluate_remote,
    prepare_data,
    prepare_downstream_set,
    publish_results,
    register,
    result_of,
    train,
    train_remote,
)

# ------------------------------------------------------------------------------------------- flows

@flow(name="evaluate-checkpoints")
def evaluate_flow(checkpoints: list[str], datasets: list[str] | dict[str, str], store: str,
                  settings: dict | None = None, publish: bool = True, raise_on_failure: bool = False) -> dict:
    """Every checkpoint on every set, one task each; a failing set fails only its own tasks.

    Args:
        checkpoints: what to evaluate: registry aliases or entry ids (`latest`, `best-flowers102`,
            `ac5a682b1301`, from `cloob registry list`), or checkpoint / run folders or URLs
            (`s3://bucket/cloob/runs/tiny-cloob-0301f47e77`).
        datasets: downstream set names prepared in the store (`["shapes", "colors"]`, or `["all"]`),
            or {name: uri} for sets elsewhere.
        store: the store's root (downstream/, registry/, results/ and cache/ under it), e.g.
            s3://bucket/cloob.
        settings: evaluation settings (cloob.evaluate.runner.EvalSettings fields), e.g.
            {"batch_size": 256, "limit": 1000}.
        publish: publish the results table and report as artifacts when done.
        raise_on_failure: fail this flow run when any evaluation fails (the pipeline's fan-out sets it).

    The pipeline's fan-out (one run of the evaluate-checkpoints/gpu deployment per checkpoint x set)
    sets publish=False (it publishes once, when every pair is in) and raise_on_failure=True (a failed
    pair is a failed flow run, which the pipeline and the UI see)."""
    from cloob.evaluate.targets import prepared_sets, resolve_models

    results = posixpath.join(store, "results")
    cache_root = posixpath.join(store, "cache", "classifiers")
    sets = dict(datasets) if isinstance(datasets, dict) else dict(prepared_sets(posixpath.join(store, "downstream"),
                                                                                 list(datasets)))
    models = resolve_models(list(checkpoints), posixpath.join(store, "registry"))
    with engine_retries():  # the tasks' threads copy this context: their end states ride out a server restart
        futures = [evaluate.submit(c, name, uri, results, cache_root, settings)
                   for c in models for name, uri in sets.items()]
        wait(futures)
    failed = [f for f in futures if f.state.is_failed()]
    for f in failed:
        get_run_logger().error("evaluation failed: %s", f.state.message)
    if failed and raise_on_failure:
        from cloob.errors import CloobError

        raise CloobError(f"{len(failed)} of {len(futures)} evaluations failed: "
                         + "; ".join(f.state.message or "?" for f in failed),
                         "see this flow run's log; rerunning evaluates only the pairs that are missing")
    report = result_of(publish_results, results) if publish else None
    return {"results": results, "report": report, "evaluated": len(futures) - len(failed), "failed": len(failed)}


@flow(name="cloob-train")
def train_flow(recipe: str, overrides: list[str], nproc_per_node: int = 1, nnodes: int = 1,
               rdzv_endpoint: str | None = None, deadline_s: float | None = None) -> dict:
    """One training run, as its own flow: what the GPU work pool runs. With nnodes > 1 this is node 0;
    the other nodes join at rdzv_endpoint with the same recipe and overrides.

    Args:
        recipe: a shipped recipe's name or a YAML path.
        overrides: section.field=value overrides (the pipeline sets data.train and train.output).
        nproc_per_node: training processes (GPUs) on this node.
        nnodes: nodes in the run.
        rdzv_endpoint: torchrun's rendezvous host:port (default: $CLOOB_RDZV_ENDPOINT, set by the
            Kubernetes job template).
        deadline_s: stop after this long (a checkpoint is written first); none: no limit.
    """
    # A server restart while it trains must not fail a training that finishes meanwhile: the task's
    # end state is sent with retries that outlast the outage (flows/outage.py).
    with engine_retries():
        return result_of(train, recipe, overrides, nproc_per_node, deadline_s, nnodes, rdzv_endpoint)


@flow(name="cloob-pipeline")
def pipeline(store: str, specs: list[str], recipes: list[str], downstream: list[str],
             overrides: list[str] | None = None, spec_overrides: list[str] | None = None,
             nproc_per_node: int = 1, train_deadline_s: float | None = None,
             eval_settings: dict | None = None, train_deployment: str | None = None,
             eval_deployment: str | None = None, cluster: str | None = None, force_prepare: bool = False,
             worker_wait_s: float | None = WORKER_WAIT_S, init_from: str | None = None,
             promote_on: list[str] | None = None, min_gain: float = 0.0, require_significant: bool = False,
             confidence: float = 0.95, approval: bool = False, approval_timeout_s: int = 3600,
             train_retries: int = RETRIES) -> dict[str, Any]:
    """specs -> shards -> one run per recipe on the first spec's data -> registry -> zero-shot
    evaluation of every run on every downstream set -> results table and report.

    What does not depend on each other overlaps: the downstream sets are prepared while the data is
    prepared and the first recipe trains; each checkpoint's evaluations start as soon as it is
    registered, while the next recipe trains. The trainings themselves run one after the other.

    Args:
        store: the store's root (datasets/, runs/, registry/, downstream/, results/ under it), a
            bucket (s3://bucket/cloob) or a folder every worker sees.
        specs: pretraining data specs (names in data_specs/ or paths); the first is trained on.
        recipes: training recipes, each a name or path with its own overrides if any
            ("tiny", "tiny loss.method=clip").
        downstream: evaluation sets to prepare and evaluate on (flowers102, gtsrb, ...).
        overrides: recipe overrides for every recipe (section.field=value, e.g. train.steps=500): they
            win over what the recipe files say; a recipe entry's own override of the same field with
            another value is a contradiction, and the pipeline fails before anything trains, naming both.
        spec_overrides: data spec overrides for every spec (e.g. source.path=s3://bucket/cc3m.tsv).
        nproc_per_node: training processes (GPUs) per node.
        train_deadline_s: stop a training after this long (it checkpoints first); none: no limit.
        eval_settings: evaluation settings (cloob.evaluate.runner.EvalSettings fields).
        train_deployment: e.g. "cloob-train/gpu": train there (a GPU work pool) instead of in this
            flow's process.
        eval_deployment: e.g. "evaluate-checkpoints/gpu": evaluate there, one run per checkpoint x
            set, instead of in this flow's process.
        cluster: the cluster preparing the data, for specs whose download.distributor is pyspark (a
            Spark master URL; else an active SparkSession or local[N]) or ray (a Ray address, ray://host:10001
            or auto; else RAY_ADDRESS or a local Ray).
        force_prepare: where a spec's folder holds a dataset prepared from another spec (a changed
            spec_overrides), delete it and prepare this spec there; refused while a registered model
            was trained on it. Without it a changed spec is a new dataset, prepared beside the old one
            (<store>/datasets/<name>-<spec hash>), which stays as it was.
        worker_wait_s: how long a run on a deployment may wait for a worker on its pool to take it
            before it is cancelled and the pipeline fails, saying so; none: no limit.
        init_from: warm start every recipe from a registered model (an alias such as champion, an entry
            id) or a checkpoint URL: its weights only, a fresh optimizer and schedule; the registry
            records it as the new entry's parent. None (the default): from scratch (docs/training.md, "Warm starts").
            `champion` while the registry has none yet (the first run): from scratch, logged.
        promote_on: the sets whose main metric decides promotion (their mean); default: every
            downstream set. After the evaluations, each new model is compared with the `champion`
            on them (same sets, same eval settings) and moves `champion` only if it wins, else
            `challenger` (docs/registry.md, "Promotion"; cloob/registry/promotion.py).
        min_gain: how much a challenger must beat the champion by, as a fraction (0.01: one point).
        require_significant: also require the paired bootstrap interval over the evaluation images
            (at `confidence`) to lie above min_gain: no promotion on noise.
        confidence: the bootstrap interval's level.
        approval: pause the run for a reviewer in the UI before a challenger becomes champion
            (approve or reject, a comment).
        approval_timeout_s: how long the pause waits; with no answer nothing is promoted and the
            run ends Failed (Prefect cannot resume a pause that timed out); the next run asks again.
        train_retries: how many times a run on train_deployment (or eval_deployment) that ends Crashed
            (its process or node died: a spot reclaim, an OOM-killed pod, a worker that stopped sending
            heartbeats for CLOOB_LOST_AFTER_S) is started again, logged with the reason; a training
            resumes from its last checkpoint in the store. 0: fail at the first crash.

    A Prefect server that is away (a restart, an upgrade) is waited for, for CLOOB_API_OUTAGE_S
    seconds (default 600; flows/outage.py), while a run on a deployment is waited for.
    """
    from flows.signals import stop_on_signals

    init_from = _warm_start_source(init_from, posixpath.join(store, "registry"))
    every = [*(overrides or []), *([f"train.init_from={init_from}"] if init_from else [])]
    # A recipe entry is a name or path, optionally with its own overrides: "tiny loss.method=clip".
    entries = [(entry, *entry.split()) for entry in recipes]
    for entry, _name, *own in entries:  # a contradiction is refused before anything is prepared or trained
        check_overrides(entry, every, own)
    with stop_on_signals("cloob-pipeline"), engine_retries():
        # Submitted first: they need nothing else, and run in threads while this one trains.
        set_futures = prepare_downstream_set.map(downstream, unmapped(posixpath.join(store, "downstream")))
        data = [result_of(prepare_data, spec, dataset_folder(store, spec), None, spec_overrides, cluster,
                          force_prepare, posixpath.join(store, "registry")) for spec in specs]
        name_run(data)  # the run list says which data (and version) each run trained on
        registry = posixpath.join(store, "registry")
        results = posixpath.join(store, "results")
        cache_root = posixpath.join(store, "cache", "classifiers")
        datasets: dict[str, str] | None = None
        runs, evals, registered = [], [], []
        for _entry, name, *own in entries:
            run_overrides = [f"train.output={store}", *every, *own]
            # The data goes in as prepare_data's results, not inside an override string, so that
            # Prefect (and its graph) sees the edge prepare_data -> train.
            if train_deployment:
                run = result_of(train_remote, train_deployment, name, run_overrides, nproc_per_node, train_deadline_s,
                                data[:1], worker_wait_s, train_retries)
            else:
                run = result_of(train, name, run_overrides, nproc_per_node, train_deadline_s, data=data[:1])
            runs.append(run)
            registered.append(result_of(register, run, registry))
            if datasets is None:  # by now the sets have had the data preparation and a training to get ready
                datasets = _prepared_sets(set_futures)
            evals += _submit_evaluations(run, datasets, store, results, cache_root, eval_settings, eval_deployment,
                                         worker_wait_s, train_retries)
        if datasets is None:  # no recipes
            datasets = _prepared_sets(set_futures)
        wait(evals)
        failed = [f for f in evals if not f.state.is_completed()]
        for f in failed:
            get_run_logger().error("evaluation failed: %s", f.state.message)
        report = result_of(publish_results, results)
        from cloob.registry import Registry

        Registry(registry).update_best(results)
        promoted = promote_models(
            registry, results, registered,
            {"promote_on": promote_on or sorted(datasets), "min_gain": min_gain,
             "require_significant": require_significant, "confidence": confidence},
            approval=approval, approval_timeout_s=approval_timeout_s,
            evaluate_champion=lambda e: _submit_evaluations({"checkpoint": e["checkpoint_uri"], "run_dir": e["run_dir"],
                                                             "step": e["step"]}, datasets, store, results, cache_root,
                                                            eval_settings, eval_deployment, worker_wait_s,
                                                            train_retries))
        promotion = [{"challenger": d["challenger"]["id"], "promoted": d["promoted"], "reason": d["reason"]}
                     for d in promoted]
        n_failed = len(failed) + len(downstream) - len(datasets)
        summary = publish_summary(data, runs, len(evals) - len(failed), n_failed, promotion)
        return {"results": results, "report": report, "evaluated": len(evals) - len(failed), "failed": n_failed,
                "runs": runs, "datasets": datasets, "promotion": promotion, "data": data, "summary": summary}


def check_overrides(entry: str, every: list[str], own: list[str]) -> None:
    """The pipeline's overrides (for every recipe) and a recipe entry's own must not set one field to two
    values: which was meant cannot be known, and the run would be named after one and train the other."""
    from cloob.errors import CloobError

    given = {}
    for ov in every:
        if "=" in ov:
            key, value = (x.strip() for x in ov.split("=", 1))
            given[key] = value
    for ov in own:
        if "=" not in ov:
            continue
        key, value = (x.strip() for x in ov.split("=", 1))
        if key in given and given[key] != value:
            raise CloobError(f"{key} is {given[key]} in the pipeline's overrides (for every recipe) and {value} in "
                             f"the recipe entry {entry!r}",
                             f"drop {key} from one of them (overrides, or the deployment's --recipe), or set both to "
                             "the same value")


def _warm_start_source(init_from: str | None, registry: str) -> str | None:
    """init_from, except `champion` while the registry has none yet (the first scheduled run of a
    deployment made with --init-from champion): that run trains from scratch and says so, and the
    next one warm-starts from the champion it made. Any other name that is missing stays an error."""
    from cloob.run.state import no_champion_yet

    if not no_champion_yet(init_from, registry):
        return init_from
    get_run_logger().info("init_from=champion: no champion in %s yet, so this run trains from scratch", registry)
    return None


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
                        settings: dict | None, deployment: str | None, worker_wait_s: float | None,
                        retries: int = RETRIES) -> list:
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
    return [evaluate_remote.submit(deployment, run["checkpoint"], name, uri, store, settings,
                                   f"evaluate-{summary_label(run)}-on-{name}", worker_wait_s, retries)
            for name, uri in datasets.items()]
