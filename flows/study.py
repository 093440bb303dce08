"""The `cloob-study` flow and `cloob study`: a study spec (cloob/study/spec.py) run as one pipeline run.

The data and the sets are prepared once; every cell (method x arch x swept point x seed) is an
ordinary training run (here, one after another; or through the cloob-train GPU deployment, all
started at once and run as its concurrency limit allows), registered, and evaluated at
the study's steps, each (checkpoint, set) an ordinary row of the results table (here, or one run of
evaluate-checkpoints/gpu). Everything is content-keyed as in the pipeline: a rerun skips what is done
and a killed study resumes where it stopped. The report (cloob/study/report.py) is written to
<store>/studies/<name>/ and published as the artifact `study-<name>`, its pictures embedded.
"""

from __future__ import annotations

import posixpath
import sys

from prefect import flow, get_run_logger, task, unmapped
from prefect.futures import as_completed, wait

from flows.outage import engine_retries
from flows.pipeline import _prepared_sets, _submit_evaluations
from flows.remote import WORKER_WAIT_S
from flows.tasks import (
    dataset_folder,
    prepare_data,
    prepare_downstream_set,
    publish_results,
    register,
    result_of,
    spec_name,
    train,
    train_remote,
)


@flow(name="cloob-study")
def study_flow(study: str, store: str, overrides: list[str] | None = None, train_deployment: str | None = None,
               eval_deployment: str | None = None, eval_settings: dict | None = None, nproc_per_node: int = 1,
               worker_wait_s: float | None = WORKER_WAIT_S, data_overrides: dict[str, list[str]] | None = None,
               cluster: str | None = None) -> dict:
    """A study: every cell trained, registered and evaluated at the study's steps; then its report.

    Args:
        study: a shipped study's name (demo, cloob_vs_clip_cc3m, ablation_cc3m) or a study YAML path.
        store: the store's root (a bucket, or a folder every worker sees).
        overrides: top-level study fields to replace (key=value, YAML values: seeds=2).
        train_deployment: e.g. "cloob-train/gpu": train every cell there.
        eval_deployment: e.g. "evaluate-checkpoints/gpu": evaluate every checkpoint x set there.
        eval_settings: evaluation settings (cloob.evaluate.runner.EvalSettings fields).
        nproc_per_node: training processes (GPUs) per node.
        worker_wait_s: how long a deployment run may wait for a worker before the study fails.
        data_overrides: data spec name -> overrides added to the study's own when the study trains on
            that spec, e.g. {"cc3m": ["source.path=s3://bucket/Train_GCC-training.tsv"]} (`cloob deploy`
            passes its --spec-override for each --spec).
        cluster: the cluster that prepares the data: a Spark master URL with download.distributor
            pyspark, a Ray address with ray.
    """
    from cloob.config import load_recipe
    from cloob.study.cells import check_cells, steps_to_evaluate
    from cloob.study.spec import load_study
    from cloob.train.checkpoint import CheckpointStore
    from flows.signals import stop_on_signals

    spec = load_study(study, list(overrides or []))
    logger = get_run_logger()
    with stop_on_signals("cloob-study"), engine_retries():  # its tasks' end states ride out a server restart
        set_futures = prepare_downstream_set.map(spec.downstream, unmapped(posixpath.join(store, "downstream")))
        data_ov = [*spec.data_overrides, *(data_overrides or {}).get(spec_name(spec.data), [])]
        data = result_of(prepare_data, spec.data, dataset_folder(store, spec.data), None, data_ov, cluster)
        registry, results = posixpath.join(store, "registry"), posixpath.join(store, "results")
        cache_root = posixpath.join(store, "cache", "classifiers")
        datasets, evals, cells_by_run = None, [], {}
        all_cells = check_cells(spec)
        logger.info("study %s: %d cells (%s), %d sets", spec.name, len(all_cells),
                    ", ".join(sorted({c.label for c in all_cells})), len(spec.downstream))
        if train_deployment:
            # On a cluster every cell's training is started now: the GPU pool runs as many at once as
            # cloob-train's concurrency limit lets it (cloob deploy --train-slots), the others queue,
            # and each finished cell is registered and evaluated while the rest train.
            pending = {train_remote.submit(train_deployment, spec.recipe, [f"train.output={store}", *cell.overrides],
                                           nproc_per_node, None, [data], worker_wait_s): cell for cell in all_cells}
            finished = ((pending[f], f.result()) for f in as_completed(list(pending)))
        else:  # one machine: one cell at a time
            finished = ((cell, result_of(train, spec.recipe, [f"train.output={store}", *cell.overrides], nproc_per_node,
                                         data=[data])) for cell in all_cells)
        for cell, run in finished:
            cells_by_run[posixpath.basename(run["run_dir"].rstrip("/"))] = cell
            result_of(register, run, registry)
            if datasets is None:
                datasets = _prepared_sets(set_futures)
            refs = {r.step: r for r in CheckpointStore(run["run_dir"]).complete()}
            for step in steps_to_evaluate(spec, sorted(refs)):
                at = {**run, "checkpoint": refs[step].url, "step": step}
                evals += _submit_evaluations(at, datasets, store, results, cache_root, eval_settings,
                                             eval_deployment, worker_wait_s)
        wait(evals)
        failed = [f for f in evals if not f.state.is_completed()]
        for f in failed:
            logger.error("evaluation failed: %s", f.state.message)
        recipe = load_recipe(spec.recipe, list(spec.overrides))
        archs = spec.archs or [recipe.model.arch]
        report = result_of(publish_study, spec.name, cells_by_run, results, posixpath.join(store, "studies", spec.name),
                           spec_name(spec.data), archs[0] if len(archs) == 1 else None, recipe.train.epochs, len(spec.seed_list))
        result_of(publish_results, results)
        return {"study": spec.name, "report": report, "runs": sorted(cells_by_run), "evaluated": len(evals) - len(failed),
                "failed": len(failed) + len(spec.downstream) - len(datasets or {})}


@task(name="publish_study", task_run_name="publish-study-{name}")
def publish_study(name: str, cells_by_run: dict, results: str, out: str, data: str, arch: str | None,
                  epochs: int | None, seeds: int) -> str:
    """The study's report (cloob.study.report.write_study) under `out`, and as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    from cloob.results.render import embed_images
    from cloob.study.report import write_study
    from flows.names import artifact_key

    files = write_study(name, cells_by_run, results, out, data, arch, epochs, seeds)
    create_markdown_artifact(embed_images(files["study.md"].decode(), files),
                             key=artifact_key("study", name),
                             description=f"study {name}: means over seeds, significance, curves")
    return posixpath.join(out, "study.md")


def run_study(study: str, store: str, overrides: list[str] | None = None, **flow_kw) -> int:
    """`cloob study`, once Prefect is set up (flows.cli: the server at PREFECT_API_URL, else an
    ephemeral one in <store>/prefect, as `cloob demo`). Prints the report."""
    from cloob.storage import Location
    from flows.signals import stop_on_signals

    with stop_on_signals("cloob study", exit_process=True):
        out = study_flow(study, store, list(overrides or []), **flow_kw)
    sys.stdout.write(Location(posixpath.dirname(out["report"])).read_bytes("study.md").decode())
    print(f"report: {out['report']}  ({len(out['runs'])} runs, {out['evaluated']} evaluations, {out['failed']} failed)")
    return 0 if not out["failed"] else 2
