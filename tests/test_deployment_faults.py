"""What a deployment loses in production, on a real Prefect server with real process workers
(tests/prefect_stack.py): a training run's process killed (an OOM kill, a pod deleted), a worker
lost with its node, and the server itself restarted while the pipeline waits for a training.

The pipeline runs here, in this process; its training runs on the workers, as `cloob deploy` sets it
up (cloob-train on a GPU pool, one run at a time per worker, one training slot)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.prefect_stack import Server, Worker

POOL = "faults-gpu-pool"
DEPLOYMENT = "cloob-train/gpu"
# Long enough to be killed in the middle (a few steps a second here), short enough for a test.
TRAIN = ["train.steps=120", "train.checkpoint_every=10", "train.batch_size=8", "data.workers=0",
         "data.shuffle_buffer=16", "schedule.warmup_steps=1"]

# drain_prefect_clients: the pipelines run in this process; their last logs and events go to the server
# while it is up, or Prefect retries them at exit (the process hung there for 1-6 minutes).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200), pytest.mark.usefixtures("drain_prefect_clients")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, make_shards):
    """A server (event persister on: heartbeats are events), the cloob-train/gpu deployment on POOL
    with one training slot, and two workers whose flow runs beat every 30 s (Prefect's minimum)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import train_flow

    home = tmp_path_factory.mktemp("faults")
    server = Server(home)
    url = server.start()
    workers = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), SyncPrefectClient(api=url) as client:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
            train_flow.to_deployment("gpu", work_pool_name=POOL, concurrency_limit=1,
                                     entrypoint_type=EntrypointType.MODULE_PATH).apply()
            workers += [Worker(url, POOL, name, home, PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30") for name in ("fa", "fb")]
            for w in workers:
                w.wait_online(client, POOL)
        yield {"server": server, "url": url, "workers": workers, "home": home, "shards": make_shards(80, 40, seed=5)}
    finally:
        for w in workers:
            w.terminate()  # all at once, then each waited for
        for w in workers:
            w.stop()
        server.stop()


def _logs(stack) -> str:
    return "".join(w.log() for w in stack["workers"]) + "\n--- server\n" + stack["server"].log()


def _overrides(stack) -> list[str]:
    return [f"data.train={stack['shards']}", *TRAIN]


def _final_sha(store: Path) -> str:
    (run,) = (store / "runs").iterdir()
    steps = sorted((run / "checkpoints").glob("step_*/meta.json"))
    assert steps and steps[-1].parent.name == "step_00000120", steps
    return json.loads(steps[-1].read_text())["model_sha256"]


@pytest.fixture(scope="module")
def undisturbed(stack, tmp_path_factory) -> str:
    """The model sha256 of the same recipe trained in one go (`cloob train`, another output)."""
    out = tmp_path_factory.mktemp("undisturbed")
    subprocess.run([str(Path(sys.executable).parent / "cloob"), "train", "tiny", f"train.output={out}",
                    "train.progress=false", *_overrides(stack)], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return _final_sha(out)


def _engine_of(stack) -> tuple[Worker, object]:
    """The worker running the training's flow run, and that flow run's process (its child)."""
    for w in stack["workers"]:
        for p in w.flow_run_processes():
            if "prefect.engine" in " ".join(p.cmdline()):
                return w, p
    raise AssertionError("no worker runs a flow run: " + _logs(stack))


def _when_checkpointed(store: Path, act) -> threading.Thread:
    """act() once the training in `store` has written its first checkpoint (in a thread: the
    pipeline runs in the main thread, where it may install its signal handlers)."""
    def watch():
        deadline = time.monotonic() + 300
        while not list(store.glob("runs/*/checkpoints/step_00000010/meta.json")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        act()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _pipeline(stack, store: Path, **params):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline

    with temporary_settings(updates={PREFECT_API_URL: stack["url"]}):
        # One small set, evaluated here: the pipeline publishes a results table, so it needs a row.
        return pipeline(store=str(store), specs=[], recipes=["tiny"], downstream=["shapes"],
                        overrides=_overrides(stack), eval_settings={"batch_size": 64, "workers": 0, "limit": 32},
                        train_deployment=DEPLOYMENT, return_state=True, **params)


def _train_runs(stack, before: dict | None = None) -> dict:
    """{name: state} of the deployment's runs, oldest first, leaving out those in `before` (by id: the
    runs of one recipe have one name whatever the store)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(api=stack["url"]) as client:
        d = client.read_deployment_by_name(DEPLOYMENT)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    return {r.name: r.state for r in runs if r.id not in (before or {}).get("ids", ())}


def _ids(stack) -> dict:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api=stack["url"]) as client:
        return {"ids": {r.id for r in client.read_flow_runs()}}


def test_a_training_whose_process_is_killed_is_started_again_and_ends_bit_exact(stack, undisturbed, tmp_path):
    """SIGKILL of the flow run's process (what an OOM kill or a deleted pod does): its worker reports
    it Crashed, the pipeline starts it again (train_retries), it resumes from the last checkpoint,
    and the model is the undisturbed run's, bit for bit."""
    store = tmp_path / "store"
    killed = {}
    before = _ids(stack)

    def kill():
        killed["worker"], proc = _engine_of(stack)
        proc.kill()
        killed["at"] = time.monotonic()

    _when_checkpointed(store, kill)
    state = _pipeline(stack, store, train_retries=2)
    assert state.is_completed(), (state.message, _logs(stack))
    assert killed, "the training ended before it could be killed"
    runs = _train_runs(stack, before)
    (first, again) = runs  # the run, and its one retry
    assert runs[first].type.value == "CRASHED" and "-9" in runs[first].message, runs
    assert again == f"{first}-retry1" and runs[again].type.value == "COMPLETED", runs
    assert _final_sha(store) == undisturbed


def test_a_training_whose_worker_is_lost_is_started_again_on_another_worker(stack, undisturbed, tmp_path,
                                                                             monkeypatch):
    """SIGKILL of a worker and its flow run (a lost node): nobody reports the run, which would stay
    Running; its heartbeats stop, and after CLOOB_LOST_AFTER_S the pipeline marks it Crashed and
    starts it again; the other worker takes it, it resumes, and the model is bit-exact."""
    monkeypatch.setenv("CLOOB_LOST_AFTER_S", "50")  # heartbeats every 30 s
    store = tmp_path / "store"
    killed = {}

    def kill():
        worker, proc = _engine_of(stack)
        worker.kill()  # the worker's own session: the flow run has one of its own, killed next
        proc.kill()  # the trainers die with it (cloob.run.lifeline)
        killed.update(worker=worker.name, at=time.monotonic())

    before = _ids(stack)
    _when_checkpointed(store, kill)
    state = _pipeline(stack, store, train_retries=2)
    took = time.monotonic() - killed["at"]
    assert state.is_completed(), (state.message, _logs(stack))
    runs = _train_runs(stack, before)
    (first, again) = runs
    assert runs[first].type.value == "CRASHED" and "no heartbeat for" in runs[first].message, runs
    assert runs[again].type.value == "COMPLETED", runs
    survivor = next(w for w in stack["workers"] if w.name != killed["worker"])
    assert f"Flow run '{again}' submitted to infrastructure" in survivor.log_path.read_text()
    assert _final_sha(store) == undisturbed
    stack["workers"].remove(next(w for w in stack["workers"] if w.name == killed["worker"]))
    print(f"lost worker: pipeline done {took:.0f} s after the kill")


def test_a_server_restart_while_the_pipeline_waits_is_ridden_out(stack, undisturbed, tmp_path, monkeypatch):
    """The server killed in the middle of a training and started again 20 s later on the same port
    and database: the training goes on, the pipeline waits, and both end Completed, bit-exact."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    monkeypatch.setenv("CLOOB_API_OUTAGE_S", "120")
    store = tmp_path / "store"
    down = {}

    def restart():
        stack["server"].kill()
        down["at"] = time.monotonic()
        time.sleep(20)
        stack["server"].start()
        down["for"] = time.monotonic() - down["at"]

    before = _ids(stack)
    t = _when_checkpointed(store, restart)
    # Prefect's own retries (5: about a minute) would hide the product's: this outage is the product's.
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 1}):
        state = _pipeline(stack, store, train_retries=0)
    t.join()
    assert down, "the training ended before the server could be killed"
    assert state.is_completed(), (state.message, _logs(stack))
    runs = _train_runs(stack, before)
    assert [s.type.value for s in runs.values()] == ["COMPLETED"], runs
    assert _final_sha(store) == undisturbed


def test_a_server_away_longer_than_the_limit_fails_saying_what_to_do(stack, tmp_path, monkeypatch):
    """Beyond CLOOB_API_OUTAGE_S the pipeline fails with one message: the server, how long, what to do."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Cancelling

    monkeypatch.setenv("CLOOB_API_OUTAGE_S", "6")
    store = tmp_path / "store"

    def outage():
        stack["server"].kill()
        time.sleep(15)  # the limit passes; then the server is back for the pipeline to report its end
        stack["server"].start()

    before = _ids(stack)
    t = _when_checkpointed(store, outage)
    state = _pipeline(stack, store, train_retries=0)
    t.join()
    assert state.is_failed(), state
    message = state.message
    assert "lost the Prefect server at" in message and "CLOOB_API_OUTAGE_S=6" in message, message
    assert "fix: start the server again" in message and "rerun the pipeline" in message, message
    with SyncPrefectClient(api=stack["url"]) as client:  # the training on the worker is not ours to leave
        for run in client.read_flow_runs():
            if run.id not in before["ids"] and not run.state.is_final():
                client.set_flow_run_state(run.id, Cancelling())
