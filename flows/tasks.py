"""The pipeline's tasks: prepare_data, prepare_downstream, train (here, or as a run of the GPU
pool's deployment), register, evaluate (likewise), publish_results.

Thin by design: every task calls one cloob function and passes URIs and hashes on, never data.
Skipping is keyed on content through cloob.run.state: each task first asks whether its output is there
and was made from these very inputs (spec, manifest, recipe and checkpoint hashes) and, if so, ends
in the state Skipped (a Completed state, with the output as its result) after logging which content
key matched. Prefect's own result cache is not used for this: its key is fixed before the task runs,
so it cannot tell "not made yet" from "made, then deleted".

Callers use `result_of(task, ...)`: a task that returns a state is returned as that state when called.
"""

from __future__ import annotations

import os
import posixpath
import time

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed

from flows import names
from flows.names import with_data
from flows.remote import RETRIES, WORKER_WAIT_S, crashed, ended, run_resubmitting


def result_of(t, *args, **kwargs):
    """Run task `t` in this flow and return its result, a Skipped one included (raises as calling it would)."""
    return t(*args, return_state=True, **kwargs).result()


def _skipped(value, what: str, key: str):
    message = f"{what}: already done (content key {key[:12]}), skipped"
    get_run_logger().info(message)
    return Completed(data=value, name="Skipped", message=message)


# ------------------------------------------------------------------------------------------- data

@task(name="prepare_data", task_run_name=names.prepare_data_name)
def prepare_data(spec: str, out: str, input: str | None = None, overrides: list[str] | None = None,
                 cluster: str | None = None, force: bool = False,
                 registry: str | None = None):
    """One pretraining dataset into webdataset shards (img2dataset runs in its own process; under
    download.distributor pyspark or ray, on the cluster `cluster` names: a Spark master URL or a Ray address).
    force: delete a dataset that `out` holds from another spec, and prepare this one there; refused
        where a model in `registry` was trained on any of its versions.

    A changed spec is a new dataset, not a rewrite of the old: where `out` holds a dataset prepared
    from another spec, this one is prepared beside it, at `<out>-<spec hash>`, so that the models
    trained on the old one stay reproducible and a schedule's own parameters keep working."""
    from cloob.prepare.run import prepare, read_manifest
    from cloob.prepare.spec import SpecChanged, load_spec
    from cloob.run.state import prepared

    s = load_spec(spec, list(overrides or []))
    if key := prepared(s, out):
        m = read_manifest(out)
        return _skipped(_data_summary(out, m), f"prepare {s.name}", key)
    if force and registry:
        _refuse_deleting_trained_data(out, registry)
    kwargs = {"input": input, "progress": False, "cluster": cluster}
    try:
        m = prepare(s, out, force=force, **kwargs)
    except SpecChanged as e:
        beside = f"{out.rstrip('/')}-{s.content_hash()[:10]}"
        get_run_logger().info("%s holds %s prepared from another spec (%s): this spec is a new dataset, prepared at %s",
                              out, s.name, "; ".join(e.differences), beside)
        out = beside
        if key := prepared(s, out):
            return _skipped(_data_summary(out, read_manifest(out)), f"prepare {s.name}", key)
        m = prepare(s, out, **kwargs)
    get_run_logger().info("%s: %d images in %d shards at %s (version %s)", m["name"], m["totals"]["successes"],
                          m["totals"]["shards"], out, m.get("version", 1))
    return _data_summary(out, m, fresh=not m.get("run", {}).get("noop", False))


def _data_summary(out: str, m: dict, fresh: bool = False) -> dict:
    """What the pipeline passes on and says of a dataset: where, its content hash and images, its
    version and what the version changed, and whether this run prepared anything (fresh)."""
    return {"uri": out, "content_hash": m["content_hash"], "images": m["totals"]["successes"],
            "name": m.get("name"), "version": m.get("version", 1), "rows_added": m.get("rows_added"),
            "rows_removed": m.get("rows_removed"), "fresh": fresh}


def _refuse_deleting_trained_data(out: str, registry: str) -> None:
    """force_prepare never deletes a dataset version that a registered model was trained on."""
    from cloob.errors import CloobError
    from cloob.prepare.run import read_manifest
    from cloob.prepare.versions import versions
    from cloob.registry import Registry

    m = read_manifest(out)
    if not m:
        return
    hashes = {m.get("content_hash")} | {v.get("content_hash") for v in versions(out)}
    trained = [e for e in Registry(registry).entries() if e.get("data_manifest_hash") in hashes - {None}]
    if trained:
        runs = ", ".join(sorted({e.get("run_id") or e["id"][:12] for e in trained})[:5])
        raise CloobError(f"force_prepare would delete {out}, on whose data {len(trained)} registered model(s) were "
                         f"trained ({runs}): they could no longer be retrained on exactly their data",
                         "leave force_prepare off: a changed spec is prepared as a new dataset beside it "
                         f"({out}-<spec hash>) and this one stays; to free the space, delete the folder by hand")


def spec_name(spec: str) -> str:
    """A data spec's name as given: `cc3m`, or a path's file stem."""
    return posixpath.splitext(posixpath.basename(spec))[0]


def dataset_folder(store: str, spec: str) -> str:
    """Where the flows prepare a data spec: <store>/datasets/<spec name>."""
    return posixpath.join(store, "datasets", spec_name(spec))


@task(name="prepare_downstream", task_run_name=names.prepare_downstream_name)
def prepare_downstream_set(name: str, out: str, source: str | None = None) -> dict:
    from cloob.evaluate.sets.prepare import prepare_downstream

    # prepare_downstream itself returns at once when the manifest matches the spec and the source.
    return prepare_downstream(name, out, source=source, progress=False)


# ---------------------------------------------------------------------------------------- training

def _checkpoint_summary(run_dir: str, checkpoint: str) -> dict:
    from cloob.registry.lineage import read_json

    meta = read_json(posixpath.join(checkpoint, "meta.json")) or {}
    return {"run_dir": run_dir, "checkpoint": checkpoint, "sha256": meta.get("model_sha256"),
            "step": meta.get("step"), "method": meta.get("method"), "init_from": meta.get("init_from")}


def _trained(r) -> dict | None:
    """The finished run of recipe `r` (content-keyed, see cloob.run.state) as (summary, key), or None.
    A warm start whose parent is this recipe's own run on this data version is that run: the data did
    not change since (cloob.run.state.warm_start_of_itself)."""
    from cloob.run.state import trained, warm_start_of_itself
    from cloob.train.checkpoint import CheckpointStore

    if key := trained(r):
        return _checkpoint_summary(r.run_dir(), CheckpointStore(r.run_dir()).latest().url), key
    if parent := warm_start_of_itself(r):
        get_run_logger().info("%s would warm-start from %s, this recipe's own run on %s: the data has not "
                              "changed since, so nothing is trained", r.run_id(), r.train.init_from, r.data.version)
        return _checkpoint_summary(*parent), f"parent {r.train.init_sha256}"
    return None


@task(name="train", task_run_name=names.train_name)
def train(recipe: str, overrides: list[str], nproc_per_node: int = 1, deadline_s: float | None = None,
          nnodes: int = 1, rdzv_endpoint: str | None = None, data: list[dict] | None = None):
    """torchrun as a supervised subprocess tree; its output goes to this task's log, its progress to
    an artifact; the deadline, a cancel or a crash here stop every process of it. data: prepare_data's
    results to train on (data.train)."""
    from cloob.config import load_recipe
    from cloob.run.launch import launch
    from cloob.run.state import identify

    # Keyed by the data's content and the warm start's weights, resolved once here (cloob.run.state).
    overrides = identify(recipe, with_data(overrides, data))
    r = load_recipe(recipe, overrides)
    if done := _trained(r):
        return _skipped({**done[0], "skipped": True}, f"train {r.run_id()}", done[1])
    logger = get_run_logger()
    logger.info("training %s: data %s%s", r.run_id(), r.data.version or r.data.train,
                f", warm start from {r.train.init_from} ({r.train.init_entry[:12]})" if r.train.init_sha256 else
                ", from scratch")
    artifact = create_progress_artifact(0.0, key=names.progress_key(r.run_id()),
                                        description=f"training {r.run_id()} ({r.loss.method})")
    show = _BestEffort(logger)
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
            show(update_progress_artifact, artifact, 100.0 * p["step"] / total, description=f"{r.run_id()}: {text}")
        if now - last["log"] > 15 or p["step"] == total:  # the trainer prints no per-step lines here
            last["log"] = now
            logger.info(text)

    result = launch(recipe, overrides, nproc_per_node=nproc_per_node, nnodes=nnodes,
                    rdzv_endpoint=rdzv_endpoint or os.environ.get("CLOOB_RDZV_ENDPOINT"), deadline_s=deadline_s,
                    on_line=lambda line: logger.info(line.rstrip()), on_progress=on_progress)
    result.check()
    show(update_progress_artifact, artifact, 100.0, description=f"done: {last['text'] or 'no step reported'}; "
                                                                f"checkpoint {result.checkpoint}")
    return _checkpoint_summary(result.run_dir, result.checkpoint)


class _BestEffort:
    """Calls that only show progress (the progress artifact): one that fails while the Prefect server
    is away is skipped, once, at once (no retries), and not tried again for a while; the training goes
    on. Raised, the error would have ended the supervision of a training that was fine."""

    PAUSE_S = 30.0

    def __init__(self, logger):
        self.logger, self.paused_until = logger, 0.0

    def __call__(self, fn, *args, **kwargs) -> None:
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        if time.monotonic() < self.paused_until:
            return
        try:
            with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
                fn(*args, **kwargs)
        except Exception as e:
            self.paused_until = time.monotonic() + self.PAUSE_S
            self.logger.warning("progress not shown (%s: %s); the training goes on", type(e).__name__, e)


@task(name="train-on-deployment", task_run_name=names.train_remote_name)
def train_remote(deployment: str, recipe: str, overrides: list[str], nproc_per_node: int = 1,
                 deadline_s: float | None = None, data: list[dict] | None = None,
                 worker_wait_s: float | None = WORKER_WAIT_S, retries: int = RETRIES):
    """Training as a run of the `cloob-train` deployment (a GPU work pool), waited for here. Its
    result is read back from the store by content, as for a finished local run, so the two flows
    share no result storage, only the store.

    A run that ends Crashed (its process or node died) is started again, up to `retries` times: it
    resumes from the last checkpoint in the store. A run that ended otherwise but whose training is
    in the store, finished (its end state lost to a server outage), counts as done."""
    from cloob.config import load_recipe
    from cloob.errors import CloobError
    from cloob.run.state import identify

    # Resolved here, so that the deployment's run trains exactly this data version and parent.
    overrides = identify(recipe, with_data(overrides, data))
    r = load_recipe(recipe, overrides)
    if done := _trained(r):
        return _skipped({**done[0], "skipped": True}, f"train {r.run_id()}", done[1])
    run = run_resubmitting(deployment, {"recipe": recipe, "overrides": overrides, "nproc_per_node": nproc_per_node,
                                        "deadline_s": deadline_s}, f"train-{r.run_id()}", worker_wait_s, retries,
                           "training run")
    done = _trained(r)
    if done and not (run.state and run.state.is_completed()):
        get_run_logger().warning("training run %s on deployment %s ended %s, but its training is finished in the "
                                 "store: taken as done", run.name, deployment, ended(run))
    if done:
        return done[0]
    if not run.state or not run.state.is_completed():
        again = f"it crashed {retries + 1} times (retries={retries}); " if crashed(run) else ""
        raise CloobError(f"training run {run.name} on deployment {deployment} ended {ended(run)}",
                         f"{again}see that flow run's log in the Prefect UI; rerunning the pipeline resumes the training")
    raise CloobError(f"training run {run.name} on deployment {deployment} completed, but the store has no "
                     f"finished checkpoint of {recipe} {' '.join(overrides)}",
                     "the deployment's worker must see the same store (train.output) as this flow: "
                     "use a shared bucket, not a local folder")


@task(name="register", task_run_name=names.register_name)
def register(run: dict, registry: str) -> str:
    """A train task's checkpoint into the registry (registering again changes nothing)."""
    from cloob.registry import Registry

    return Registry(registry).register(run["checkpoint"])["id"]


# -------------------------------------------------------------------------------------- evaluation

_SUMMARY = ("run_id", "checkpoint_id", "dataset", "main_metric", "main_value", "n_images", "n_skipped")


@task(name="evaluate", task_run_name=names.evaluate_name)
def evaluate(checkpoint: str, dataset: str, dataset_uri: str, results: str, cache_root: str | None = None,
             settings: dict | None = None):
    """One checkpoint on one zero-shot set -> one row appended to the results table (the runner's own
    per-pair function: the same skip rule as `cloob evaluate`)."""
    from cloob.errors import CloobError
    from cloob.evaluate.datasets import open_classification_set
    from cloob.evaluate.pairs import evaluate_pair
    from cloob.evaluate.runner import EvalSettings
    from cloob.evaluate.zeroshot import ClassifierCache

    ds = open_classification_set(dataset, dataset_uri)
    o = evaluate_pair(checkpoint, ds, EvalSettings(**(settings or {})), results=results,
                      cache=ClassifierCache(cache_root), progress=False)
    if o.error:
        raise CloobError(o.error)
    row = o.row
    if o.reused:
        return _skipped({k: row[k] for k in _SUMMARY}, f"evaluate {row['run_id']} on {ds.name}", row["row_uuid"])
    get_run_logger().info("%s on %s: %s %.4f (%d images, %d skipped)", row["run_id"], ds.name,
                          row["main_metric"], row["main_value"], row["n_images"], row["n_skipped"])
    return {k: row[k] for k in _SUMMARY}


@task(name="evaluate-on-deployment", task_run_name=names.evaluate_remote_name)
def evaluate_remote(deployment: str, checkpoint: str, dataset: str, dataset_uri: str, store: str,
                    settings: dict | None = None, run_name: str | None = None,
                    worker_wait_s: float | None = WORKER_WAIT_S, retries: int = RETRIES):
    """One checkpoint on one set as a run of the evaluate-checkpoints deployment (a GPU work pool),
    waited for here. A pair already in the results table starts no run; the row is read back from
    the table in the store, by content, not from Prefect's results (as train-on-deployment does).
    A run that ends Crashed is started again, up to `retries` times."""
    from cloob.errors import CloobError
    from cloob.evaluate.datasets import open_classification_set
    from cloob.evaluate.pairs import finished_row
    from cloob.evaluate.runner import EvalSettings

    results = posixpath.join(store, "results")
    ds = open_classification_set(dataset, dataset_uri)
    eval_settings = EvalSettings(**(settings or {}))
    if row := finished_row(checkpoint, ds, eval_settings, results):
        return _skipped({k: row[k] for k in _SUMMARY}, f"evaluate {row['run_id']} on {ds.name}", row["row_uuid"])
    run = run_resubmitting(deployment, {"checkpoints": [checkpoint], "datasets": {dataset: dataset_uri},
                                        "store": store, "settings": settings, "publish": False,
                                        "raise_on_failure": True}, run_name, worker_wait_s, retries, "evaluation run")
    row = finished_row(checkpoint, ds, eval_settings, results)
    if not row and (not run.state or not run.state.is_completed()):
        again = f"it crashed {retries + 1} times (retries={retries}); " if crashed(run) else ""
        raise CloobError(f"evaluation run {run.name} on deployment {deployment} ended {ended(run)}",
                         f"{again}see that flow run's log in the Prefect UI; rerunning the pipeline evaluates only "
                         "the pairs that are missing")
    if row:  # an end state lost to a server outage does not undo a row that is in the table
        get_run_logger().info("%s on %s: %s %.4f (%d images, %d skipped; run %s)", row["run_id"], ds.name,
                              row["main_metric"], row["main_value"], row["n_images"], row["n_skipped"], run.name)
        return {k: row[k] for k in _SUMMARY}
    raise CloobError(f"evaluation run {run.name} on deployment {deployment} completed, but the results table "
                     f"{results} has no row of {checkpoint} on {ds.name}",
                     "the deployment's worker must see the same store as this flow: use a shared bucket, not a "
                     "local folder")


def _percent(v: float | None) -> str | None:
    return None if v is None or v != v else f"{100 * v:.1f}%"  # v != v: NaN


@task(name="publish_results", task_run_name="publish-results")
def publish_results(results: str) -> str:
    """The results table as a table artifact, and the report (results.md with its pictures) as a
    markdown artifact and as files under <results>/report."""
    from cloob.results.arrange import build_report
    from cloob.results.render import embed_images
    from cloob.results.report import render_report, write_report
    from cloob.results.table import read_rows

    rows = read_rows(results, latest=True).to_pylist()
    cols = ("run_id", "step", "method", "arch", "dataset", "main_metric", "main_value", "top1", "top5",
            "n_images", "n_skipped")
    # Metrics are fractions in the table; people read percentages, rounded as the printed table is.
    shown = [{k: _percent(r.get(k)) if k in ("main_value", "top1", "top5") else r.get(k) for k in cols} for r in rows]
    create_table_artifact(shown, key="cloob-results", description=f"results table at {results} (accuracies in percent)")
    report = build_report(results)
    files = render_report(report)
    # The pictures go into the artifact as data: URIs: the UI cannot follow results.md's relative links.
    create_markdown_artifact(embed_images(files["results.md"].decode(), files), key="cloob-report",
                             description="cloob results: tables, results.png and the training curves")
    return write_report(report, posixpath.join(results, "report"), files)["markdown"]
