"""A training pod deleted or evicted (SIGTERM), on the path Kubernetes takes, without a cluster.

Pod 0 of a training Job runs `tini -- python -m flows.k8s_node prefect flow-run execute`, which execs
Prefect's supervisor with the env the Kubernetes worker renders from deploy/k8s/gpu-job-template.json
(PREFECT__FLOW_RUN_ID, PREFECT_API_URL and PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule among
it). Here that command runs as a process of this machine against a real Prefect server, the env
rendered by prefect-kubernetes' own job configuration for the flow run; the flow run is one of the
cloob-train/gpu deployment on a Kubernetes pool with the project's template. SIGTERM in the middle of
the training (what the kubelet sends pod 0's main process), and when that process exits, everything
it started that is still there gets SIGKILL (a container ends with its main process). Then:
the ranks wrote the checkpoint of the step they stopped after; the flow run is back in Scheduled
(AwaitingRetry), for the worker to start again; that run, executed again as a new Job's pod 0 would,
resumes from the checkpoint and ends with the same model and losses, bit for bit, as a training that
was never stopped (deploy/k8s/README.md, Preemption)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import child_env

from tests.prefect_stack import Server, clean_env

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "deploy" / "k8s" / "gpu-job-template.json"
POOL = "sigterm-k8s-pool"
STEPS, EVERY, NPROC = 30, 10, 1
TRAIN = ["train.batch_size=8", "train.log_every=1", "data.workers=1", "data.shuffle_buffer=40",
         "schedule.warmup_steps=2", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.run_name=r",
         "train.progress=false"]



@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A Prefect server, a Kubernetes pool with the project's template, and the cloob-train/gpu
    deployment on it with the job variables `cloob deploy --k8s` gives it (1 node, NPROC GPUs)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cloob.data import synthetic
    from flows.pipeline import train_flow

    home = tmp_path_factory.mktemp("k8s-sigterm")
    synthetic.write_shards(home / "shards", 160, shard_size=40, image_size=32, seed=7)  # 10 steps per epoch
    server = Server(home)
    url = server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), SyncPrefectClient(api=url) as client:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="kubernetes",
                                                   base_job_template=json.loads(TEMPLATE.read_text())))
            job_variables = {"image": "reg/cloob-gpu:7", "namespace": "default", "nnodes": 1,
                             "gpus_per_node": NPROC, "s3_secret_name": "cloob-s3"}
            deployment_id = train_flow.to_deployment(
                "gpu", work_pool_name=POOL, job_variables=job_variables,
                parameters={"nproc_per_node": NPROC, "nnodes": 1}, concurrency_limit=1,  # as cloob deploy sets it
                entrypoint_type=EntrypointType.MODULE_PATH).apply()
        yield {"server": server, "url": url, "home": home, "shards": home / "shards", "deployment": deployment_id}
    finally:
        server.stop()


def _overrides(stack, out: Path) -> list[str]:
    return [f"data.train={stack['shards']}", f"train.output={out}", *TRAIN]


@pytest.fixture(scope="module")
def undisturbed(stack, tmp_path_factory):
    """(model sha256, losses) of the same training run in one go (cloob.run.launch, no Prefect)."""
    from cloob.run.launch import launch

    out = tmp_path_factory.mktemp("undisturbed")
    result = launch("tiny", _overrides(stack, out), nproc_per_node=NPROC, env={"OMP_NUM_THREADS": "1"})
    assert result.ok, "\n".join(result.log_tail)
    return _final(out)


def _final(out: Path) -> tuple[str, list]:
    from cloob.train.checkpoint import CheckpointStore

    run_dir = out / "runs" / "r"
    meta = CheckpointStore(str(run_dir)).latest().meta()
    assert meta["step"] == STEPS
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return meta["model_sha256"], losses


def _pod_env(client, url: str, flow_run) -> dict:
    """The env of pod 0's container as the Kubernetes worker renders it for this flow run (its plain
    values; the downward-API and secret entries are the cluster's to fill in)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    pool = client.read_work_pool(POOL)
    deployment = client.read_deployment(flow_run.deployment_id)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
            pool.base_job_template, {**deployment.job_variables, **(flow_run.job_variables or {})}))
        config.prepare_for_flow_run(flow_run=flow_run, deployment=deployment)
    (c,) = config.job_manifest["spec"]["template"]["spec"]["containers"]
    assert c["command"][-2:] == ["-m", "flows.k8s_node"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e and "$(" not in e["value"]}
    env.pop("PREFECT_HOME", None)  # the rendering process's own
    return {"env": env, "argv": [sys.executable, *c["command"][-2:], *c["args"]]}


def _start_pod0(stack, flow_run_id, log: Path) -> subprocess.Popen:
    """pod 0's main process: what the Job's container runs (less tini), after the worker has marked
    the run Pending, as it does before it creates the Job (which takes the deployment's one
    concurrency slot: a rescheduled run must have given it back)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.states import Pending

    with SyncPrefectClient(api=stack["url"]) as client:
        assert client.set_flow_run_state(flow_run_id, Pending()).status.value == "ACCEPT"
        pod = _pod_env(client, stack["url"], client.read_flow_run(flow_run_id))
    assert pod["env"]["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"
    assert pod["env"]["PREFECT__FLOW_RUN_ID"] == str(flow_run_id) and pod["env"]["PREFECT_API_URL"] == stack["url"]
    env = clean_env(**pod["env"], JOB_COMPLETION_INDEX="0", OMP_NUM_THREADS="1",
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with open(log, "a") as f:
        return subprocess.Popen(pod["argv"], cwd=stack["home"], env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _state(stack, flow_run_id):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api=stack["url"]) as client:
        return client.read_flow_run(flow_run_id).state


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_preempted_training_pod_saves_is_rescheduled_and_its_rerun_resumes_bit_exact(stack, undisturbed,
                                                                                        tmp_path):
    from prefect.client.orchestration import SyncPrefectClient

    from cloob.train.checkpoint import CheckpointStore

    out, log = tmp_path / "store", tmp_path / "pod0.log"
    run_dir = out / "runs" / "r"
    with SyncPrefectClient(api=stack["url"]) as client:
        flow_run = client.create_flow_run_from_deployment(
            stack["deployment"], parameters={"recipe": "tiny", "overrides": _overrides(stack, out)})

    # 1. Pod 0 trains; SIGTERM to it once the first checkpoint is written and the training goes on.
    pod = _start_pod0(stack, flow_run.id, log)
    seen: set[psutil.Process] = set()
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / f"step_{EVERY:08d}" / "meta.json").exists():
        assert pod.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
        seen.update(psutil.Process(pod.pid).children(recursive=True))
        time.sleep(0.2)
    seen.update(psutil.Process(pod.pid).children(recursive=True))
    assert any("cloob.run.torchrun" in " ".join(p.cmdline()) for p in seen if p.is_running()), log.read_text()
    pod.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    rc = pod.wait(timeout=240)
    took = time.monotonic() - signalled
    # The container ends with its main process: whatever is left of the training is killed now.
    left = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    text = log.read_text()
    assert rc == 0 and "Flow run successfully rescheduled" in text, (rc, text[-5000:])
    assert not left, ([p.cmdline()[:6] for p in left], text[-5000:])
    # The ranks stopped after the same step and wrote its checkpoint before pod 0's process ended.
    latest = CheckpointStore(str(run_dir)).latest()
    stopped = latest.step
    # Written for the stop (meta.json's reason), whichever step it landed on: a signal slowed on its way
    # through Prefect's processes may reach the ranks on a regular checkpoint's step.
    assert EVERY < stopped < STEPS and latest.meta()["reason"] == "stopped", (stopped, text[-5000:])
    state = _state(stack, flow_run.id)
    assert state.type.value == "SCHEDULED" and state.name == "AwaitingRetry", state

    # 2. The worker starts the rescheduled run again (a new Job): it resumes and completes.
    pod = _start_pod0(stack, flow_run.id, log)
    rc = pod.wait(timeout=300)
    text = log.read_text()
    assert rc == 0 and _state(stack, flow_run.id).type.value == "COMPLETED", (rc, text[-5000:])
    sha, losses = _final(out)
    assert losses[:stopped] == undisturbed[1][:stopped]  # the first run's steps, kept
    assert (sha, losses) == undisturbed
    print(f"SIGTERM to pod 0 -> its process exited after {took:.1f} s, checkpoint of step {stopped} written")


# A command that, on SIGTERM, leaves a process behind that "saves" (writes `marker`) a second later, in
# a session of its own, and exits at once: what `prefect flow-run execute` does with a training's
# torchrun when it reschedules the run.
_LEAVES_A_SAVER = """
import pathlib, signal, subprocess, sys, time
def on_term(*_):
    subprocess.Popen([sys.executable, "-c", "import pathlib, sys, time; time.sleep(1.5); "
                      "pathlib.Path(sys.argv[1]).write_text('saved')", sys.argv[1]], start_new_session=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("behavior", ["reschedule", ""])
def test_pod0_outlives_what_the_flow_runs_command_leaves_saving(tmp_path, behavior):
    """In a Job (the SIGTERM behaviour set) node 0 passes SIGTERM on to the command and, when it has
    exited, waits for what it left before the container's main process ends; without it, node 0 is the
    command (exec) and ends with it, before the save."""
    marker = tmp_path / "saved"
    env = child_env({k: v for k, v in os.environ.items() if k not in ("CLOOB_K8S_SHAPE", "PREFECT__FLOW_RUN_ID")},
                    JOB_COMPLETION_INDEX="0", PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=behavior)
    pod = subprocess.Popen([sys.executable, "-m", "flows.k8s_node", sys.executable, "-c", _LEAVES_A_SAVER, str(marker)],
                           env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert pod.stdout.readline().strip() == "ready"
        pod.send_signal(signal.SIGTERM)
        assert pod.wait(timeout=60) == 0
        assert marker.exists() == bool(behavior)
    finally:
        if pod.poll() is None:
            pod.kill()
        time.sleep(2)  # the saver of the exec case ends by itself
