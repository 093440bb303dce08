"""Runs that GPU-pool process workers take (conftest's gpu_workers: two workers on a real local
Prefect server, where `cloob deploy --gpu-pool` put cloob-train/gpu and evaluate-checkpoints/gpu):
cancelling a training stops torchrun and its ranks; the pipeline evaluates on the workers while it
trains; a study's cells train side by side; a run no worker takes fails after worker_wait_s."""

import json
import posixpath
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.prefect_stack import GPU_TEST_POOL


def _run_tree(marker: str) -> list:
    """The live processes whose command line names `marker` (torchrun and its ranks of one run)."""
    import psutil

    from cloob.run.launch import still_running

    return still_running(p for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in p.info["cmdline"] or []))


def _worker_logs(gpu_workers) -> str:
    return "".join(f"--- {name}\n" + p.read_text()[-2000:] for name, p in gpu_workers["logs"].items())


@pytest.mark.slow
def test_cancelling_a_deployed_training_run_stops_torchrun_and_its_ranks(gpu_workers, tmp_path, make_shards):
    """What the UI's Cancel does to a cloob-train run on a process worker: the run ends Cancelled and
    torchrun, its rank and the rank's DataLoader worker are gone, not orphaned."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    from cloob.run.launch import still_running

    url = gpu_workers["url"]
    shards = make_shards(80, 40, seed=5)
    out = tmp_path / "train-out"  # in every process of the run's command line: how we find them
    with SyncPrefectClient(api=url) as client:
        train = client.read_deployment_by_name("cloob-train/gpu")
        assert train.work_pool_name == GPU_TEST_POOL
        run = client.create_flow_run_from_deployment(train.id, parameters={
            "recipe": "tiny", "overrides": [f"data.train={shards}", f"train.output={out}",
                                            "train.steps=1000000", "train.batch_size=8", "data.workers=1",
                                            "data.shuffle_buffer=40"]})
        deadline = time.monotonic() + 180
        while not list(out.glob("runs/*/metrics.jsonl")):  # training is stepping
            assert time.monotonic() < deadline, _worker_logs(gpu_workers)
            time.sleep(0.5)
        tree = _run_tree(str(out))
        names = [" ".join(p.cmdline()) for p in tree]
        assert any("cloob.run.torchrun" in n for n in names) and sum("-m cloob.train" in n for n in names) >= 2, names

        client.set_flow_run_state(run.id, Cancelling())  # what the UI and `prefect flow-run cancel` do
        deadline = time.monotonic() + 90
        while client.read_flow_run(run.id).state.type != StateType.CANCELLED:
            assert time.monotonic() < deadline, _worker_logs(gpu_workers)
            time.sleep(0.2)
        # Gone by the time the run is Cancelled: the train task stopped them before it let the
        # flow end. (Were they left to die of a broken stdout pipe, torchrun would outlive the
        # run by half a minute, training on unsupervised.)
        left = still_running(tree)
        assert not left and not _run_tree(str(out)), [" ".join(p.cmdline()) for p in left]


def _runs_of(client, deployment) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                                 limit=200)


def _tasks_of(client, flow_run_id) -> list:
    """A flow run's own task runs (not the placeholders Prefect makes for the deployment runs it starts)."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    return [t for t in client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
        any_=[flow_run_id]))) if ".run_deployment." not in t.task_key]


@pytest.mark.slow
def test_pipeline_evaluates_on_the_gpu_workers_while_it_trains(gpu_workers, tmp_path, drain_prefect_clients):
    """pipeline(eval_deployment="evaluate-checkpoints/gpu") with two process workers on the GPU pool: a
    deployment run per checkpoint x set, named for what it evaluates, spread over both workers; a set
    that fails fails only its own runs; every row once in the results table. The stages overlap (the
    sets are prepared while the first recipe trains; the first checkpoint's evaluations start while
    the second trains). A rerun starts no run for a finished pair."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cloob.evaluate.sets.prepare import prepare_downstream
    from cloob.results.table import read_rows
    from flows.names import progress_key
    from flows.pipeline import pipeline

    url = gpu_workers["url"]
    store = tmp_path / "store"
    # colors is prepared already (so the pipeline finds it done), with every picture damaged after:
    # its evaluations fail on the GPU workers (no readable image), not where the pipeline runs.
    colors = prepare_downstream("colors", str(store / "downstream"), progress=False)
    for f in Path(colors["uri"]).rglob("*"):
        if f.suffix in (".jpg", ".jpeg", ".png"):
            f.write_bytes(b"not an image")
    params = dict(store=str(store), specs=["demo"], recipes=["tiny", "tiny loss.method=clip"], downstream=["shapes", "colors"],
                  # The demo's data, 32 pictures (img2dataset against its local server): the recipes train 2 steps.
                  spec_overrides=["source.samples=32", "download.shard_size=16"],
                  overrides=["train.steps=2", "train.checkpoint_every=2",
                             "train.batch_size=8", "data.workers=0", "data.shuffle_buffer=16",
                             "schedule.warmup_steps=1"],
                  eval_settings={"batch_size": 64, "workers": 0, "limit": 32}, eval_deployment="evaluate-checkpoints/gpu")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        state = pipeline(**params, return_state=True)
    assert state.is_completed(), state.message  # a failed set does not fail the pipeline: it is reported
    out = state.result()
    assert (out["evaluated"], out["failed"]) == (2, 2), _worker_logs(gpu_workers)
    run_ids = [posixpath.basename(r["run_dir"]) for r in out["runs"]]
    results = str(store / "results")
    rows = read_rows(results, latest=False).to_pylist()
    assert sorted((r["run_id"], r["dataset"]) for r in rows) == sorted((run, "shapes") for run in run_ids)  # once each

    with SyncPrefectClient(api=url) as client:
        ev_gpu = client.read_deployment_by_name("evaluate-checkpoints/gpu")
        assert ev_gpu.work_pool_name == GPU_TEST_POOL
        runs = {r.name: r for r in _runs_of(client, ev_gpu)}
        assert sorted(runs) == sorted(f"evaluate-{run}-step2-on-{ds}" for run in run_ids for ds in ("shapes", "colors"))
        assert {n: r.state.type.value for n, r in runs.items()} == {
            n: "COMPLETED" if n.endswith("-on-shapes") else "FAILED" for n in runs}
        assert "no readable image" in runs[f"evaluate-{run_ids[0]}-step2-on-colors"].state.message
        # Spread over both workers: each says in its log which runs it started (both may try to take
        # one; the server gives it to one of them).
        logs = {name: p.read_text() for name, p in gpu_workers["logs"].items()}
        took = {name: {n for n in runs if f"Flow run '{n}' submitted to infrastructure" in text}
                for name, text in logs.items()}
        assert all(took.values()) and sum(map(len, took.values())) == 4, (took, _worker_logs(gpu_workers))

        # What overlapped, from the pipeline's task runs (the server records them from the client's
        # events, a moment later).
        deadline = time.monotonic() + 30
        while True:
            tasks = _tasks_of(client, state.state_details.flow_run_id)
            trains = sorted((t for t in tasks if t.task_key.startswith("train-") and t.end_time),
                            key=lambda t: t.start_time)
            prepares = [t for t in tasks if t.name.startswith("prepare-downstream-") and t.end_time]
            if len(trains) == len(prepares) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(trains) == len(prepares) == 2, [(t.name, t.end_time) for t in tasks]
        assert trains[0].end_time <= trains[1].start_time  # training stays one run at a time
        assert max(t.start_time for t in prepares) < trains[0].end_time  # the sets are prepared meanwhile
        # The first checkpoint's evaluation runs were made as soon as it was registered, while the
        # second recipe trained (on this machine they also start then: see the README).
        first = [r for n, r in runs.items() if n.startswith(f"evaluate-{run_ids[0]}-")]
        assert max(r.created for r in first) < trains[1].end_time
        # Each training's progress artifact is keyed by its run and ends with the final step and the checkpoint.

        for run_id, r in zip(run_ids, out["runs"]):
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[progress_key(run_id)])))
            assert arts and arts[0].data == 100.0, arts
            assert arts[0].description.startswith("done: step 2/2, loss ") and r["checkpoint"] in arts[0].description
        # A failed pair's task says what failed and one fix (not the deployment run's own nested one).
        failed = [t for t in tasks if t.name.endswith("-on-colors-via-evaluate-checkpoints/gpu") and t.state.is_failed()]
        assert len(failed) == 2 and all(t.state.message.count("fix:") == 1 and "no readable image" in t.state.message
                                        for t in failed), [t.state.message for t in failed]
        # Every task run says what it does: the method (in the run's name), the set, the checkpoint step.
        assert all("-cloob-" in r or "-clip-" in r for r in run_ids) and len(set(run_ids)) == 2
        evals = {f"evaluate-{run}-step2-on-{ds}-via-evaluate-checkpoints/gpu" for run in run_ids for ds in ("shapes", "colors")}
        assert sorted(t.name for t in tasks) == sorted({"prepare-demo", "prepare-downstream-shapes", "prepare-downstream-colors",
                                                        *(f"train-{run}" for run in run_ids),
                                                        *(f"register-{run}-step2" for run in run_ids), *evals, "publish-results",
                                                        # promotion: each new model decided (the first has no champion)
                                                        *(f"decide-{run}-step2" for run in run_ids),
                                                        *["record-promotion"] * len(run_ids)})
        # The graph's edge prepare_data -> train: the data is passed as prepare_data's result.
        by_name = {t.name: t for t in tasks}
        for run in run_ids:
            assert by_name["prepare-demo"].id in {i.id for i in by_name[f"train-{run}"].task_inputs["data"]}
            assert by_name[f"train-{run}"].id in {i.id for i in by_name[f"register-{run}-step2"].task_inputs["run"]}
        # The results are on the pipeline's run, keyed, in percent.
        pipeline_run = state.state_details.flow_run_id
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cloob-results"])))
        assert table[0].flow_run_id == pipeline_run
        shown = json.loads(table[0].data)
        assert sorted((a["run_id"], a["top1"]) for a in shown) == sorted(
            (r["run_id"], f"{100 * r['top1']:.1f}%") for r in rows)
        report = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cloob-report"])))
        assert report[0].flow_run_id == pipeline_run and report[0].type == "markdown"
        # Its pictures are embedded (the UI cannot follow a relative link): the same PNGs as the files.
        import base64

        embedded = [base64.b64decode(b) for b in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report[0].data)]
        files = store / "results" / "report"
        assert embedded[0] == (files / "results.png").read_bytes() and (files / "training.png").read_bytes() in embedded
        drawn = json.loads((files / "training.json").read_text())
        assert sorted(r["run_id"] for r in drawn["runs"]) == sorted(run_ids)
        for r in drawn["runs"]:  # the loss drawn is the run's own metrics.jsonl
            logged = [json.loads(line) for line in (store / "runs" / r["run_id"] / "metrics.jsonl").read_text().splitlines()]
            assert r["series"]["loss"] == [[m["step"], m["loss"]] for m in logged if "loss" in m]

        # A rerun of the finished part: nothing trains, and no evaluation run is started; the tasks
        # that found their output end Skipped, saying which content key matched.
        with temporary_settings(updates={PREFECT_API_URL: url}):
            again = pipeline(**{**params, "downstream": ["shapes"]}, return_state=True)
        assert (again.result()["evaluated"], again.result()["failed"]) == (2, 0)
        assert len(_runs_of(client, ev_gpu)) == 4
        assert len(read_rows(results, latest=False)) == 2
        rerun = {t.name: t.state for t in _tasks_of(client, again.state_details.flow_run_id)}
        skipped = ["prepare-demo", *(f"train-{run}" for run in run_ids),
                   *(f"evaluate-{run}-step2-on-shapes-via-evaluate-checkpoints/gpu" for run in run_ids)]
        assert {n: rerun[n].name for n in skipped} == dict.fromkeys(skipped, "Skipped"), rerun
        assert all("already done (content key " in rerun[n].message for n in skipped)

        # A changed spec is a new dataset, prepared beside the old one, which stays as the registered
        # models' data; force_prepare, which would delete it, is refused while models were trained on it.
        changed = {**params, "recipes": [], "downstream": [], "spec_overrides": ["source.samples=24", "download.shard_size=16"]}
        with temporary_settings(updates={PREFECT_API_URL: url}):
            beside = pipeline(**changed, return_state=True)
            assert beside.is_completed(), beside.message
            forced = pipeline(**changed, force_prepare=True, return_state=True)
        assert forced.is_failed() and "registered model(s) were trained" in forced.message, forced.message
        manifests = {p.name: json.loads((p / "_cloob" / "manifest.json").read_text())["totals"]["successes"]
                     for p in (store / "datasets").iterdir() if p.name.startswith("demo")}
        assert manifests.pop("demo") == 32 and list(manifests.values()) == [24], manifests


@pytest.mark.slow
def test_a_study_trains_and_evaluates_its_cells_on_the_gpu_workers(gpu_workers, tmp_path, drain_prefect_clients):
    """The cloob-study flow as the cloob-study/cluster deployment runs it: every cell one run of
    cloob-train/gpu, every (checkpoint, set) one run of evaluate-checkpoints/gpu, taken by the GPU
    pool's workers; the data spec's overrides come as the deployment passes them (data_overrides);
    the report is the table's numbers."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cloob.results.table import read_rows
    from flows.study import study_flow

    url = gpu_workers["url"]
    store = tmp_path / "store"
    spec = {"name": "gpu_pool_study", "data": "demo", "recipe": "tiny", "methods": ["cloob", "clip"], "seeds": 1,
            "overrides": ["train.steps=2", "train.batch_size=8", "data.workers=0", "data.shuffle_buffer=16",
                          "schedule.warmup_steps=1"],
            "downstream": ["shapes"], "evaluate": {"every": 1}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    with temporary_settings(updates={PREFECT_API_URL: url}):
        state = study_flow(str(tmp_path / "study.yaml"), str(store), train_deployment="cloob-train/gpu",
                           eval_deployment="evaluate-checkpoints/gpu",
                           data_overrides={"demo": ["source.samples=32", "download.shard_size=16"]},
                           eval_settings={"batch_size": 64, "workers": 0, "limit": 32}, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert (len(out["runs"]), out["evaluated"], out["failed"]) == (2, 4, 0), _worker_logs(gpu_workers)
    manifest = json.loads((store / "datasets" / "demo" / "_cloob" / "manifest.json").read_text())
    assert manifest["totals"]["successes"] == 32  # the deployment's data overrides reached the study's data
    rows = read_rows(str(store / "results"), latest=False).to_pylist()
    assert sorted((r["run_id"], r["step"]) for r in rows) == sorted((run, st) for run in out["runs"] for st in (1, 2))
    with SyncPrefectClient(api=url) as client:
        trained = {r.name: r for r in _runs_of(client, client.read_deployment_by_name("cloob-train/gpu"))}
        evaluated = {r.name: r for r in _runs_of(client, client.read_deployment_by_name("evaluate-checkpoints/gpu"))}
    for run in out["runs"]:
        assert trained[f"train-{run}"].state.is_completed()
        for st in (1, 2):
            assert evaluated[f"evaluate-{run}-step{st}-on-shapes"].state.is_completed()
    # The cells trained side by side, one on each worker (cloob deploy --train-slots 2).
    spans = [(trained[f"train-{run}"].start_time, trained[f"train-{run}"].end_time) for run in out["runs"]]
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    report = json.loads((store / "studies" / "gpu_pool_study" / "study.json").read_text())
    finals = {f["group"]: f["values"] for f in report["final"]}
    assert finals == {m: [r["main_value"] for r in rows if r["method"] == m and r["step"] == 2] for m in ("cloob", "clip")}
    assert "too few seeds" in (store / "studies" / "gpu_pool_study" / "study.md").read_text()


@pytest.mark.slow
def test_a_deployment_run_no_worker_takes_is_logged_and_fails_after_worker_wait_s(gpu_workers, tmp_path, make_shards,
                                                                                  drain_prefect_clients):
    """A pipeline training on a pool with no worker: it logs that it waits for a worker on that pool,
    then cancels the run and fails, naming the pool and the fix, after worker_wait_s."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline, train_flow

    url = gpu_workers["url"]
    shards = make_shards(16, 16, seed=5)
    with temporary_settings(updates={PREFECT_API_URL: url}), SyncPrefectClient(api=url) as client:
        client.create_work_pool(WorkPoolCreate(name="test-empty-pool", type="process"), overwrite=True)
        train_flow.to_deployment("nowhere", work_pool_name="test-empty-pool").apply()
        state = pipeline(store=str(tmp_path / "store"), specs=[], recipes=["tiny"], downstream=[],
                         overrides=[f"data.train={shards}", "train.steps=2"],
                         train_deployment="cloob-train/nowhere", worker_wait_s=4, return_state=True)
        assert state.is_failed()
        assert "no worker on work pool 'test-empty-pool' took it (no worker online)" in state.message, state.message
        assert "prefect worker start --pool test-empty-pool" in state.message
        (child,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        assert child.state.type.value == "CANCELLED" and child.name.startswith("train-tiny-cloob-steps2-")
        deadline = time.monotonic() + 30  # logs reach the server a moment later
        said = "waiting for a worker on work pool test-empty-pool (no worker online); gives up after 4 s"
        while True:
            logs = [lg.message for lg in client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))]
            if any(said in m for m in logs):
                break
            assert time.monotonic() < deadline, [m for m in logs if "waiting" in m] or logs
            time.sleep(0.5)
