"""Deployments for real infrastructure, tested without a cluster or docker (the compose stack:
test_compose.py; the Dockerfiles: test_docker_images.py; the Kubernetes job template: test_k8s_template.py):
`cloob deploy --dry-run`, the error without a server, deployments created on a real local Prefect
server and read back, and flows.k8s_node (with one real two-node torchrun on this machine)."""

import copy
import json
import os
import posixpath
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

# Before Prefect is imported (as in test_flows.py): its settings are read once.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "deploy" / "k8s" / "gpu-job-template.json"
FAKE_SECRET = "fake-secret-d41d8cd98f00b204"  # must never leave the environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra) -> dict:
    """This process's environment for a `python -m flows.deploy` subprocess: a fresh Prefect home,
    no Prefect server unless given, and a fake S3 secret that must not show up anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=tempfile.mkdtemp(prefix="prefect-home-"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", AWS_ACCESS_KEY_ID="fake-key-id", AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
               PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------- k8s template
# (its tests: test_k8s_template.py; the dry-run test below renders its job variables through this)

def _render(values: dict, flow_run_id: str = "1b5e2b2a-0000-4000-8000-000000000000") -> dict:
    """The job configuration the Kubernetes worker makes for a flow run: variable defaults, then the
    deployment's job variables, through Prefect's own apply_values (BaseJobConfiguration.
    from_template_and_values), then what KubernetesWorkerJobConfiguration.prepare_for_flow_run adds
    (prefect-kubernetes worker.py: its env in front of a hard-coded env list, the command split into args)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    variables = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    variables.update(values)
    config = apply_values(copy.deepcopy(template["job_configuration"]), variables)
    env = {"PREFECT_API_URL": "http://prefect:4200/api", "PREFECT__FLOW_RUN_ID": flow_run_id,
           **(config.get("env") or {})}
    container = config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert isinstance(container["env"], list)
    container["env"] = [{"name": k, "value": v} for k, v in env.items()] + container["env"]
    args = container.get("args")
    container["args"] = shlex.split(args if isinstance(args, str) else "prefect flow-run execute")
    return config


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container["env"]}


# ----------------------------------------------------------------------------------- cloob deploy --dry-run

def _dry_run(capsys, monkeypatch, *argv) -> tuple[int, str, str]:
    import flows.deploy as deploy

    def no_server(*a, **k):
        raise AssertionError("a dry run contacted the server")

    monkeypatch.setattr(deploy, "check_server", no_server)
    monkeypatch.setattr(deploy, "apply_plan", no_server)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-key-id")
    rc = deploy.main(["--dry-run", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dry_run_prints_the_five_deployments(capsys, monkeypatch):
    rc, out, err = _dry_run(capsys, monkeypatch, "--store", "s3://bucket/cloob", "--spec", "cc3m",
                            "--spec-override", "source.path=s3://bucket/cc3m.tsv", "--recipe", "tiny loss.method=clip",
                            "--gpus-per-node", "2", "--study", "cloob_vs_clip_cc3m")
    assert rc == 0, err
    plan = yaml.safe_load(out)
    assert {p["name"]: p["type"] for p in plan["work_pools"]} == {"cloob-cpu": "process", "cloob-gpu": "process"}
    d = {x["name"]: x for x in plan["deployments"]}
    assert set(d) == {"cloob-pipeline/retrain", "evaluate-checkpoints/cpu", "evaluate-checkpoints/gpu", "cloob-train/gpu",
                      "cloob-study/cluster"}
    pipe, ev, train = d["cloob-pipeline/retrain"], d["evaluate-checkpoints/cpu"], d["cloob-train/gpu"]
    # The study runs on the CPU pool, on demand, one at a time; its cells train on the GPU pool, and
    # the data spec's source file reaches the study's data (cc3m) as it reaches the pipeline's.
    study = d["cloob-study/cluster"]
    assert (study["work_pool"], study["schedules"], study["concurrency_limit"]) == ("cloob-cpu", [], 1)
    assert study["parameters"] == {"store": "s3://bucket/cloob", "study": "cloob_vs_clip_cc3m",
                                   "train_deployment": "cloob-train/gpu", "eval_deployment": None, "nproc_per_node": 2,
                                   "data_overrides": {"cc3m": ["source.path=s3://bucket/cc3m.tsv"]}}
    ev_gpu = d["evaluate-checkpoints/gpu"]
    assert pipe["work_pool"] == ev["work_pool"] == "cloob-cpu" and train["work_pool"] == ev_gpu["work_pool"] == "cloob-gpu"
    # Evaluation stays on the CPU pool unless asked (--eval-on gpu); the GPU one has no limit of its own.
    assert pipe["parameters"]["eval_deployment"] is None and ev_gpu["concurrency_limit"] is None
    assert ev_gpu["parameters"] == {"store": "s3://bucket/cloob"} and ev_gpu["entrypoint"] == ev["entrypoint"]
    assert pipe["schedules"] == [{"cron": "0 3 * * 0", "timezone": "UTC", "active": True}]
    assert pipe["parameters"]["store"] == ev["parameters"]["store"] == "s3://bucket/cloob"
    assert pipe["parameters"]["train_deployment"] == train["name"]  # the pipeline trains on the GPU pool
    assert pipe["parameters"]["recipes"] == ["tiny loss.method=clip"]
    assert pipe["parameters"]["spec_overrides"] == ["source.path=s3://bucket/cc3m.tsv"]
    assert pipe["parameters"]["nproc_per_node"] == train["parameters"]["nproc_per_node"] == 2
    assert train["concurrency_limit"] == 1 and train["schedules"] == [] and ev["schedules"] == []
    rc, out, err = _dry_run(capsys, monkeypatch, "--store", "s3://bucket/cloob", "--spec", "demo", "--train-slots", "4")
    assert {x["name"]: x for x in yaml.safe_load(out)["deployments"]}["cloob-train/gpu"]["concurrency_limit"] == 4
    assert {x["entrypoint"] for x in d.values()} == {"flows.pipeline.pipeline", "flows.pipeline.evaluate_flow",
                                                     "flows.pipeline.train_flow", "flows.study.study_flow"}
    assert "--limit 1" in " ".join(plan["next_steps"])  # a GPU worker takes one run at a time
    assert FAKE_SECRET not in out + err and "fake-key-id" not in out + err


def test_dry_run_k8s_json_has_job_variables_the_pool_accepts(capsys, monkeypatch):
    rc, out, err = _dry_run(capsys, monkeypatch, "--store", "s3://bucket/cloob", "--spec", "demo", "--k8s",
                            "--image", "reg/cloob-gpu:7", "--nnodes", "2", "--gpus-per-node", "8",
                            "--cron", "30 2 * * *", "--timezone", "Europe/Vienna", "--eval-on", "gpu", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    pools = {p["name"]: p for p in plan["work_pools"]}
    assert pools["cloob-gpu-k8s"]["type"] == "kubernetes"
    assert "--base-job-template deploy/k8s/gpu-job-template.json" in pools["cloob-gpu-k8s"]["create"]
    d = {x["name"]: x for x in plan["deployments"]}
    train = d["cloob-train/gpu"]
    assert train["work_pool"] == "cloob-gpu-k8s" and train["concurrency_limit"] == 1
    assert train["parameters"] == {"nproc_per_node": 8, "nnodes": 2}
    jv = train["job_variables"]
    assert (jv["image"], jv["nnodes"], jv["gpus_per_node"]) == ("reg/cloob-gpu:7", 2, 8)
    assert d["cloob-pipeline/retrain"]["schedules"][0] == {"cron": "30 2 * * *", "timezone": "Europe/Vienna",
                                                           "active": True}
    # --eval-on gpu: the pipeline fans evaluation out to the GPU pool, one pod with one GPU per run.
    assert d["cloob-pipeline/retrain"]["parameters"]["eval_deployment"] == "evaluate-checkpoints/gpu"
    ev_gpu = d["evaluate-checkpoints/gpu"]
    assert ev_gpu["work_pool"] == "cloob-gpu-k8s" and ev_gpu["job_variables"] == {**jv, "nnodes": 1, "gpus_per_node": 1}
    # What the server checks when the deployment is created: job variables against the pool's schema.
    from prefect.utilities.schema_tools import validate

    for variables in (jv, ev_gpu["job_variables"]):
        validate(variables, json.loads(TEMPLATE.read_text())["variables"], raise_on_error=True, preprocess=True,
                 ignore_required=True)
    # ... and the pods this makes train on 2 nodes of 8 GPUs.
    c = _render(jv)["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert _env(c)["CLOOB_K8S_SHAPE"]["value"] == "2x8" and c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert FAKE_SECRET not in out + err


@pytest.mark.parametrize("argv, problem", [
    (["--nnodes", "2"], "needs the Kubernetes pool"),
    (["--k8s"], "needs an image"),
    (["--image", "x:1"], "--image is used by the Kubernetes pool only"),
    (["--cron", "61 * * * *"], "Invalid cron"),
    (["--timezone", "Mars/Olympus"], "Mars/Olympus"),
    (["--recipe", "no-such-recipe"], "no-such-recipe"),
    (["--downstream", "no-such-set"], "no-such-set"),
    (["--study", "no-such-study"], "no-such-study"),
    (["--train-slots", "0"], "--train-slots 0"),
    (["--study", "cloob_vs_clip_cc3m"], "trains on data spec 'cc3m', which has no source.path"),
    (["--spark-master", "spark://head:7077"], "--spark-master is for download.distributor=pyspark"),
    (["--ray-address", "head:6379", "--spec-override", "download.distributor=pyspark"],
     "--ray-address is for download.distributor=ray"),
    (["--cluster", "spark://head:7077"], "--cluster is for download.distributor=pyspark or ray"),
    (["--cluster", "head:6379", "--spec-override", "download.distributor=pyspark"],
     "--cluster head:6379 is not a Spark master URL"),
    (["--downstream", "shapes", "--promote-on", "colors"], "--promote-on colors: not among the --downstream sets"),
    (["--min-gain", "1.5"], "--min-gain 1.5 is not a fraction"),
    (["--confidence", "95"], "--confidence 95.0 is not in (0, 1)"),
    (["--approval-timeout-s", "0"], "--approval-timeout-s 0 is not positive"),
])
def test_deploy_refuses_what_cannot_work_with_a_fix(capsys, monkeypatch, argv, problem):
    rc, out, err = _dry_run(capsys, monkeypatch, "--store", "s3://b/x", "--spec", "demo", *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and problem in err and "\n  fix: " in err


def test_the_scheduled_retrains_promotion_rule_is_set_at_deploy_time(capsys, monkeypatch):
    """The rule the schedule runs under: the flags given become the retrain's parameters; the rest keep
    the flow's defaults (so a later change of a default reaches deployments that did not set it)."""
    argv = ("--store", "s3://b/x", "--spec", "demo", "--downstream", "shapes", "--downstream", "colors", "--json")
    rc, out, err = _dry_run(capsys, monkeypatch, *argv, "--promote-on", "shapes", "--min-gain", "0.01",
                            "--require-significant", "--approval", "--approval-timeout-s", "86400",
                            "--init-from", "champion")
    assert rc == 0, err
    params = {d["name"]: d for d in json.loads(out)["deployments"]}["cloob-pipeline/retrain"]["parameters"]
    assert {k: params[k] for k in ("promote_on", "min_gain", "require_significant", "approval", "approval_timeout_s",
                                   "init_from")} == {"promote_on": ["shapes"], "min_gain": 0.01,
                                                     "require_significant": True, "approval": True,
                                                     "approval_timeout_s": 86400, "init_from": "champion"}
    rc, out, err = _dry_run(capsys, monkeypatch, *argv)
    params = {d["name"]: d for d in json.loads(out)["deployments"]}["cloob-pipeline/retrain"]["parameters"]
    assert not {"promote_on", "min_gain", "require_significant", "confidence", "approval", "init_from"} & set(params)


@pytest.mark.parametrize("flag", ["--cluster", "--ray-address"])  # the engine's own flag is an alias
def test_dry_run_names_the_cluster_that_prepares_the_data(capsys, monkeypatch, flag):
    rc, out, err = _dry_run(capsys, monkeypatch, "--store", "s3://b/x", "--spec", "demo", "--spec-override",
                            "download.distributor=ray", flag, "head:6379", "--json")
    assert rc == 0, err
    deployments = {d["name"]: d for d in json.loads(out)["deployments"]}
    params = deployments["cloob-pipeline/retrain"]["parameters"]
    assert params["cluster"] == "head:6379"
    study = deployments["cloob-study/cluster"]["parameters"]  # a study prepares its data there too
    assert study["cluster"] == "head:6379" and study["data_overrides"] == {"demo": ["download.distributor=ray"]}
    assert params["spec_overrides"] == ["download.distributor=ray"]
    from flows.pipeline import pipeline
    from flows.study import study_flow

    # The pipeline and the study take what the deployment passes, and hand it to cloob prepare.
    assert "cluster" in pipeline.parameters.properties and "cluster" in study_flow.parameters.properties


def test_deploy_wants_a_store_every_worker_sees_and_a_source_file_for_cc3m(capsys, monkeypatch):
    rc, _, err = _dry_run(capsys, monkeypatch, "--store", "relative/store", "--spec", "demo")
    assert rc == 2 and "relative path" in err and "fix: " in err
    rc, _, err = _dry_run(capsys, monkeypatch, "--store", "s3://b/x")  # default spec cc3m, no source file
    assert rc == 2 and "source.path" in err and "--spec-override source.path=" in err


# ----------------------------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port of 127.0.0.1 (no UI; of the background services only the
    task-run recorder, which turns the clients' task-run events into the task runs that the API and
    the UI's graph show), started here and waited for by the test that needs it; its database lives
    in a temporary PREFECT_HOME."""
    port = _free_port()
    home = tmp_path_factory.mktemp("prefect-server-home")
    off = ("CANCELLATION_CLEANUP", "DB_VACUUM", "EVENT_PERSISTER", "EVENT_LOGGER", "FOREMAN", "LATE_RUNS",
           "SCHEDULER", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CLEANUP_RECONCILER", "TRIGGERS")
    env = _clean_env(PREFECT_HOME=str(home), PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED="true",
                     **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in off})
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"

    def wait(timeout: float = 90.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                time.sleep(0.25)
        raise AssertionError("the Prefect server did not start: " + (home / "server.log").read_text()[-3000:])

    yield wait
    os.killpg(proc.pid, 15)  # our own server's process group (uvicorn runs in a child)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, 9)  # whatever of the group is left
    except ProcessLookupError:
        pass
    proc.wait()
    log.close()


def test_deploy_without_a_reachable_server_says_how_to_start_one(capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.deploy as deploy

    monkeypatch.setattr(deploy, "apply_plan", lambda plan: pytest.fail("deployed without a server"))
    argv = ["--store", "s3://b/x", "--spec", "demo"]
    closed = f"http://127.0.0.1:{_free_port()}/api"
    # Unset: Prefect would fall back to a temporary server that vanishes with the command.
    for settings, problem in (({"restore_defaults": {PREFECT_API_URL}}, "PREFECT_API_URL is not set"),
                              ({"updates": {PREFECT_API_URL: closed}}, f"server at {closed} is not reachable")):
        with temporary_settings(**settings):
            assert deploy.main(argv) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and problem in err, err
        assert "fix: start one (`PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start`" in err
        assert "docker/compose.yaml" in err
        assert "PREFECT_API_URL=" in err and out == ""


@pytest.mark.slow
def test_deploy_creates_pools_and_deployments_on_a_real_server(prefect_server, tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.sorting import DeploymentSort
    from prefect.flows import load_flow_from_entrypoint
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.deploy as deploy

    url = prefect_server()
    proc = subprocess.run([sys.executable, "-m", "flows.deploy", "--store", "s3://bucket/cloob", "--spec", "demo",
                           "--recipe", "tiny", "--recipe", "tiny loss.method=clip", "--downstream", "shapes",
                           "--worker-wait-s", "600"],
                          cwd=ROOT, env=_clean_env(PREFECT_API_URL=url), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cloob-train/gpu" in proc.stdout and FAKE_SECRET not in proc.stdout + proc.stderr

    with SyncPrefectClient(api=url) as client:
        pools = {p.name: p for p in client.read_work_pools(limit=200)}
        assert {n: p.type for n, p in pools.items() if n.startswith("cloob")} == {"cloob-cpu": "process",
                                                                                 "cloob-gpu": "process"}
        pipe = client.read_deployment_by_name("cloob-pipeline/retrain")
        ev = client.read_deployment_by_name("evaluate-checkpoints/cpu")
        train = client.read_deployment_by_name("cloob-train/gpu")
        ev_gpu = client.read_deployment_by_name("evaluate-checkpoints/gpu")
        assert (pipe.work_pool_name, ev.work_pool_name, train.work_pool_name) == ("cloob-cpu", "cloob-cpu", "cloob-gpu")
        assert ev_gpu.work_pool_name == "cloob-gpu" and ev_gpu.global_concurrency_limit is None
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in pipe.schedules] == [("0 3 * * 0", "UTC", True)]
        assert train.global_concurrency_limit.limit == 1  # deployment concurrency_limit=1, as the server keeps it
        assert pipe.global_concurrency_limit.limit == 1 and ev.global_concurrency_limit is None
        assert pipe.parameters["store"] == ev.parameters["store"] == "s3://bucket/cloob"
        assert pipe.parameters["recipes"] == ["tiny", "tiny loss.method=clip"]
        assert pipe.parameters["train_deployment"] == "cloob-train/gpu" and pipe.parameters["eval_deployment"] is None
        assert pipe.parameters["worker_wait_s"] == 600
        # The UI's run form describes every parameter (from the flows' docstrings); evaluation takes
        # set names and registry aliases.
        study = client.read_deployment_by_name("cloob-study/cluster")
        assert (study.work_pool_name, study.global_concurrency_limit.limit) == ("cloob-cpu", 1)
        assert study.parameters["train_deployment"] == "cloob-train/gpu" and "study" not in study.parameters
        assert "study" in study.parameter_openapi_schema["required"]  # no --study: each run names one
        for d in (pipe, ev, train, study):
            props = d.parameter_openapi_schema["properties"]
            assert all(p.get("description") for p in props.values()), {k: p.get("description") for k, p in props.items()}
        ev_props = ev.parameter_openapi_schema["properties"]
        assert "registry aliases" in ev_props["checkpoints"]["description"]
        assert "set names prepared in the store" in ev_props["datasets"]["description"]
        assert {"type": "array", "items": {"type": "string"}} in ev_props["datasets"]["anyOf"]
        assert not pipe.pull_steps and not train.pull_steps  # the worker runs its installed code
        # A worker loads each flow from its module entrypoint: the names must be the deployments' flows.
        for d, flow_name in ((pipe, "cloob-pipeline"), (ev, "evaluate-checkpoints"), (train, "cloob-train"),
                             (study, "cloob-study")):
            assert load_flow_from_entrypoint(d.entrypoint).name == flow_name
        first_ids = {pipe.id, ev.id, train.id, ev_gpu.id}

    # Again, for Kubernetes with another schedule (in-process this time, against the same server):
    # the same deployments are updated, the schedule replaced, and the kubernetes pool created.
    with temporary_settings(updates={PREFECT_API_URL: url}):
        rc = deploy.main(["--store", "s3://bucket/cloob", "--spec", "demo", "--recipe", "tiny", "--downstream",
                          "shapes", "--k8s", "--image", "reg/cloob-gpu:7", "--nnodes", "2", "--gpus-per-node", "4",
                          "--cron", "30 2 * * *", "--timezone", "Europe/Vienna", "--eval-on", "gpu"])
    assert rc == 0
    with SyncPrefectClient(api=url) as client:
        pool = client.read_work_pool("cloob-gpu-k8s")
        assert pool.type == "kubernetes" and pool.base_job_template == json.loads(TEMPLATE.read_text())
        pipe = client.read_deployment_by_name("cloob-pipeline/retrain")
        train = client.read_deployment_by_name("cloob-train/gpu")
        assert {pipe.id, train.id} <= first_ids
        assert [(s.schedule.cron, s.schedule.timezone) for s in pipe.schedules] == [("30 2 * * *", "Europe/Vienna")]
        assert train.work_pool_name == "cloob-gpu-k8s" and train.global_concurrency_limit.limit == 1
        assert train.job_variables == {"image": "reg/cloob-gpu:7", "namespace": "default", "nnodes": 2,
                                       "gpus_per_node": 4, "s3_secret_name": "cloob-s3"}
        assert train.parameters == {"nproc_per_node": 4, "nnodes": 2}
        # --eval-on gpu: the scheduled pipeline evaluates on the GPU pool, a one-pod Job per run.
        ev_gpu = client.read_deployment_by_name("evaluate-checkpoints/gpu")
        assert pipe.parameters["eval_deployment"] == "evaluate-checkpoints/gpu" and ev_gpu.id in first_ids
        assert ev_gpu.work_pool_name == "cloob-gpu-k8s" and ev_gpu.job_variables["nnodes"] == 1
        # Nothing the server keeps holds the S3 secret of the deploying process.
        deployments = client.read_deployments(limit=200, sort=DeploymentSort.NAME_ASC)
        stored = json.dumps([d.model_dump(mode="json") for d in deployments] +
                            [p.model_dump(mode="json") for p in client.read_work_pools(limit=200)])
        assert FAKE_SECRET not in stored and "fake-key-id" not in stored

        # A pool someone changed by hand is left alone, with the command that would replace it.
        from prefect.client.schemas.actions import WorkPoolUpdate

        from cloob.errors import CloobError

        edited = json.loads(TEMPLATE.read_text())
        edited["variables"]["properties"]["shm_size"]["default"] = "64Gi"
        client.update_work_pool("cloob-gpu-k8s", WorkPoolUpdate(base_job_template=edited))
        k8s_pool = {"name": "cloob-gpu-k8s", "type": "kubernetes", "base_job_template": str(TEMPLATE)}
        note = deploy.ensure_pool(client, k8s_pool)
        assert "differs" in note and "prefect work-pool update cloob-gpu-k8s --base-job-template" in note
        assert client.read_work_pool("cloob-gpu-k8s").base_job_template == edited
        with pytest.raises(CloobError, match="exists with type 'process'"):
            deploy.ensure_pool(client, {**k8s_pool, "name": "cloob-cpu"})


@pytest.mark.slow
def test_prefect_deployment_ls_lists_what_cloob_deploy_made(prefect_server):
    """The Prefect CLI of our environment against a server of our environment, after `cloob deploy`.
    With fastapi 0.151 to 0.154, prefect 3.8.8's server answers its client's explicit null limit with
    422, so `prefect deployment ls` (and Flow.deploy()) failed: fastapi is pinned below 0.151."""
    url = prefect_server()
    bin_dir = Path(sys.executable).parent
    cloob = [str(bin_dir / "cloob")] if (bin_dir / "cloob").exists() else [sys.executable, "-m", "flows.cli"]
    prefect = [str(bin_dir / "prefect")] if (bin_dir / "prefect").exists() else [sys.executable, "-m", "prefect"]
    env = _clean_env(PREFECT_API_URL=url, COLUMNS="250")  # rich wraps a table to the terminal's width
    deployed = subprocess.run([*cloob, "deploy", "--store", "s3://bucket/cloob", "--spec", "demo", "--recipe", "tiny",
                               "--downstream", "shapes"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    ls = subprocess.run([*prefect, "deployment", "ls"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=180)
    assert ls.returncode == 0, ls.stdout[-3000:] + ls.stderr[-3000:]
    for name in ("cloob-pipeline/retrain", "evaluate-checkpoints/cpu", "evaluate-checkpoints/gpu", "cloob-train/gpu",
                 "cloob-study/cluster"):
        assert name in ls.stdout, ls.stdout


def _run_tree(marker: str) -> list:
    """The live processes whose command line names `marker` (torchrun and its ranks of one run)."""
    import psutil

    from cloob.run.launch import still_running

    return still_running(p for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in p.info["cmdline"] or []))


# ----------------------------------------------------------------------------------- flows.k8s_node

class _Result:
    def __init__(self, returncode=0, cancelled=False):
        self.returncode, self.cancelled, self.timed_out = returncode, cancelled, False
        self.log_tail = ["last line"]

    @property
    def ok(self):
        return self.returncode == 0 and not self.cancelled


@pytest.fixture
def node(monkeypatch):
    """flows.k8s_node with the Prefect API and cloob.run.launch.launch replaced by recorders."""
    import cloob.run.launch
    import flows.k8s_node as k8s_node

    state = {"params": {"recipe": "tiny", "overrides": ["train.steps=5"], "nproc_per_node": 4, "nnodes": 3,
                        "rdzv_endpoint": None, "deadline_s": None},
             "states": ["RUNNING"], "launches": [], "result": _Result(), "lookups": []}

    def flow_run(run_id):
        state["lookups"].append(run_id)
        return dict(state["params"]), state["states"][min(len(state["lookups"]) - 1, len(state["states"]) - 1)]

    def launch(recipe, overrides, **kw):
        state["launches"].append((recipe, overrides, kw))
        return state["result"]() if callable(state["result"]) else state["result"]

    monkeypatch.setattr(k8s_node, "flow_run", flow_run)
    monkeypatch.setattr(cloob.run.launch, "launch", launch)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(uuid.uuid4()))
    monkeypatch.setenv("CLOOB_RDZV_ENDPOINT", "localhost:29400")  # resolves: no wait for DNS
    monkeypatch.setenv("CLOOB_K8S_SHAPE", "3x4")
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    state["module"] = k8s_node
    return state


def test_k8s_node_worker_index_launches_torchrun_as_that_node(node, monkeypatch, capsys):
    from cloob.run.launch import build_command

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert node["module"].main(["prefect", "flow-run", "execute"]) == 0
    ((recipe, overrides, kw),) = node["launches"]
    assert (recipe, overrides) == ("tiny", ["train.steps=5"])
    assert (kw["nproc_per_node"], kw["nnodes"], kw["node_rank"], kw["rdzv_endpoint"]) == (4, 3, 2, "localhost:29400")
    assert node["lookups"] == [os.environ["PREFECT__FLOW_RUN_ID"]]  # its parameters, from the API
    cmd = build_command(recipe, overrides, nproc_per_node=4, nnodes=3, node_rank=2, rdzv_endpoint=kw["rdzv_endpoint"])
    assert cmd[cmd.index("--node_rank") + 1] == "2" and cmd[cmd.index("--rdzv_endpoint") + 1] == "localhost:29400"
    # Its status is the exit code: a failed torchrun fails the pod, and with it the Job.
    node["launches"].clear()
    node["result"] = _Result(returncode=3)
    assert node["module"].main([]) == 3


def test_k8s_node_index_0_execs_the_flow_run_command(node, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execvp", lambda f, args: calls.append((f, list(args))))
    assert node["module"].main(["prefect", "flow-run", "execute"]) == 127  # only reached with execvp replaced
    assert calls == [("prefect", ["prefect", "flow-run", "execute"])] and node["launches"] == []
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    node["params"]["nnodes"] = 2  # the Job has 3 pods: the rendezvous would never complete
    assert node["module"].main(["prefect", "flow-run", "execute"]) == 2
    assert len(calls) == 1


def test_k8s_node_refuses_a_job_that_does_not_match_the_flow_run(node, monkeypatch, capsys):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    node["params"]["nnodes"] = 2
    assert node["module"].main([]) == 2
    err = capsys.readouterr().err
    assert "nnodes=2" in err and "3 pods" in err and "fix: " in err and node["launches"] == []
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID")
    assert node["module"].main([]) == 2 and "PREFECT__FLOW_RUN_ID" in capsys.readouterr().err


def test_k8s_node_stops_when_the_flow_run_ends_without_it(node, monkeypatch):
    """Node 0 found the run trained and skipped it (or failed first): the others stop waiting."""
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    node["states"] = ["COMPLETED"]
    assert node["module"].main([]) == 0 and node["launches"] == []  # already over: nothing to join
    node["lookups"].clear()
    node["states"] = ["RUNNING", "RUNNING", "FAILED"]
    monkeypatch.setattr(node["module"], "WATCH_S", 0.05)

    def wait_for_stop():
        (_, _, kw), = node["launches"]
        assert kw["stop"].wait(10), "the watcher never stopped the node"
        return _Result(returncode=-15, cancelled=True)

    node["result"] = wait_for_stop
    assert node["module"].main([]) == 1  # the run failed: so does this node


@pytest.mark.slow
def test_k8s_node_joins_a_real_two_node_torchrun(monkeypatch, tmp_path, capsys):
    """Pod 1 through flows.k8s_node and node 0 through cloob.run.launch (what the cloob-train flow runs),
    both on this machine with a c10d rendezvous on 127.0.0.1: one run with a global batch of two nodes."""
    import cloob.run.launch
    import flows.k8s_node as k8s_node
    from cloob.data import synthetic

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    synthetic.write_shards(tmp_path / "shards", 80, shard_size=40, image_size=32, seed=3)
    overrides = [f"data.train={tmp_path / 'shards'}", f"train.output={tmp_path / 'out'}", "train.batch_size=8",
                 "train.steps=3", "train.checkpoint_every=3", "data.workers=1", "data.shuffle_buffer=40",
                 "schedule.warmup_steps=1"]
    endpoint = f"127.0.0.1:{_free_port()}"
    params = {"recipe": "tiny", "overrides": overrides, "nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": None}
    monkeypatch.setattr(k8s_node, "flow_run", lambda run_id: (params, "RUNNING"))
    for k, v in {"JOB_COMPLETION_INDEX": "1", "PREFECT__FLOW_RUN_ID": str(uuid.uuid4()),
                 "CLOOB_RDZV_ENDPOINT": endpoint, "CLOOB_K8S_SHAPE": "2x1"}.items():
        monkeypatch.setenv(k, v)
    node0: dict = {}
    lines: list[str] = []
    t = threading.Thread(target=lambda: node0.setdefault("result", cloob.run.launch.launch(
        "tiny", overrides, nproc_per_node=1, nnodes=2, node_rank=0, rdzv_endpoint=endpoint, on_line=lines.append,
        deadline_s=240)))
    t.start()
    try:
        assert k8s_node.main([]) == 0
    finally:
        t.join(timeout=240)
    r = node0["result"]
    assert r.ok, r.log_tail[-20:]
    assert r.checkpoint and r.checkpoint.endswith("step_00000003")
    # The trainer's first line (from global rank 0, on either node): both nodes' ranks are in one run.
    text = "\n".join(lines) + capsys.readouterr().out
    assert "2 x 8 = global batch 16" in text, text[-3000:]


# ----------------------------------------------------------------------------------- GPU-pool workers
# Last in the file: the module's two workers poll the server until the module ends.

GPU_TEST_POOL = "test-gpu-pool"  # not cloob-*: test_deploy_creates_pools... counts those


@pytest.fixture(scope="module")
def gpu_workers(prefect_server, tmp_path_factory):
    """Two process workers, gpu-a and gpu-b, on GPU_TEST_POOL, where `cloob deploy --gpu-pool` has put
    cloob-train/gpu and evaluate-checkpoints/gpu (store: a temporary folder). Each takes one run at a
    time (`--limit 1`, as `cloob deploy` tells GPU workers to) and polls every second, not every 10 s
    (Prefect's default). Started once for the module: {"url", "store", "logs": {name: log file}}."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.deploy as deploy

    url = prefect_server()
    home = tmp_path_factory.mktemp("gpu-workers")
    store = home / "store"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        # Two training slots, one per worker: a study's cells train side by side.
        assert deploy.main(["--store", str(store), "--spec", "demo", "--recipe", "tiny", "--downstream", "shapes",
                            "--gpu-pool", GPU_TEST_POOL, "--train-slots", "2"]) == 0
    env = _clean_env(PREFECT_API_URL=url, OMP_NUM_THREADS="1", PREFECT_WORKER_QUERY_SECONDS="1")
    procs, logs = {}, {}
    for name in ("gpu-a", "gpu-b"):
        logs[name] = home / f"{name}.log"
        with open(logs[name], "w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", GPU_TEST_POOL, "--type", "process",
                 "--name", name, "--limit", "1"], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        with SyncPrefectClient(api=url) as client:  # both polling before a test hands them work
            while {w.name for w in client.read_workers_for_work_pool(GPU_TEST_POOL)} != set(procs):
                for name, p in procs.items():
                    assert p.poll() is None and time.monotonic() < deadline, logs[name].read_text()[-3000:]
                time.sleep(0.5)
        yield {"url": url, "store": store, "logs": logs}
    finally:
        for p in procs.values():
            os.killpg(p.pid, 15)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()


def _worker_logs(gpu_workers) -> str:
    return "".join(f"--- {name}\n" + p.read_text()[-2000:] for name, p in gpu_workers["logs"].items())


@pytest.mark.slow
def test_cancelling_a_deployed_training_run_stops_torchrun_and_its_ranks(gpu_workers, tmp_path):
    """What the UI's Cancel does to a cloob-train run on a process worker: the run ends Cancelled and
    torchrun, its rank and the rank's DataLoader worker are gone, not orphaned."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    from cloob.data import synthetic
    from cloob.run.launch import still_running

    url = gpu_workers["url"]
    synthetic.write_shards(tmp_path / "shards", 80, shard_size=40, image_size=32, seed=5)
    out = tmp_path / "train-out"  # in every process of the run's command line: how we find them
    with SyncPrefectClient(api=url) as client:
        train = client.read_deployment_by_name("cloob-train/gpu")
        assert train.work_pool_name == GPU_TEST_POOL
        run = client.create_flow_run_from_deployment(train.id, parameters={
            "recipe": "tiny", "overrides": [f"data.train={tmp_path / 'shards'}", f"train.output={out}",
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


@pytest.fixture
def drain_prefect_clients():
    """After a test that ran flows in this process: their last logs and events go to the server while
    it is up (at exit, with the module's server gone, Prefect would retry them for about a minute)."""
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)


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
def test_a_deployment_run_no_worker_takes_is_logged_and_fails_after_worker_wait_s(gpu_workers, tmp_path,
                                                                                  drain_prefect_clients):
    """A pipeline training on a pool with no worker: it logs that it waits for a worker on that pool,
    then cancels the run and fails, naming the pool and the fix, after worker_wait_s."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cloob.data import synthetic
    from flows.pipeline import pipeline, train_flow

    url = gpu_workers["url"]
    synthetic.write_shards(tmp_path / "shards", 16, shard_size=16, image_size=32, seed=5)
    with temporary_settings(updates={PREFECT_API_URL: url}), SyncPrefectClient(api=url) as client:
        client.create_work_pool(WorkPoolCreate(name="test-empty-pool", type="process"), overwrite=True)
        train_flow.to_deployment("nowhere", work_pool_name="test-empty-pool").apply()
        state = pipeline(store=str(tmp_path / "store"), specs=[], recipes=["tiny"], downstream=[],
                         overrides=[f"data.train={tmp_path / 'shards'}", "train.steps=2"],
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


# ----------------------------------------------------------------------------------- the weekly retrain

CPU_TEST_POOL = "test-cpu-pool"


def _table(path: Path, base: str, ids) -> None:
    """A url/caption table of demo pictures served by `base`; each caption names its row (`row 7: ...`)."""
    from cloob.prepare.demo_server import render

    path.write_text("url\tcaption\n" + "".join(f"{base}/3/64/1/{i}.jpg\trow {i}: {render(3, 64, 1, i)[1]}\n"
                                               for i in ids))


def _fetched(server) -> list[int]:
    """The rows the image server was asked for since the last call."""
    out = sorted(int(p.rsplit("/", 1)[1].split(".")[0]) for p in server.httpd.requests)
    server.httpd.requests.clear()
    return out


def _run_deployment(client, name: str, logs: dict, parameters: dict | None = None, timeout: float = 600):
    """A run of deployment `name` as its schedule (no parameters) or a person (`parameters`) starts
    it, taken by the workers; its final flow run."""
    from prefect.states import StateType

    d = client.read_deployment_by_name(name)
    run = client.create_flow_run_from_deployment(d.id, parameters=parameters or {})
    deadline = time.monotonic() + timeout
    while (r := client.read_flow_run(run.id)).state.type not in (StateType.COMPLETED, StateType.FAILED,
                                                                 StateType.CRASHED, StateType.CANCELLED):
        assert time.monotonic() < deadline, "".join(p.read_text()[-3000:] for p in logs.values())
        time.sleep(1)
    assert r.state.type == StateType.COMPLETED, (r.state.message, "".join(p.read_text()[-4000:] for p in logs.values()))
    return r


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_weekly_retrain_on_both_pools_fetches_new_rows_warm_starts_and_promotes_by_the_numbers(
        gpu_workers, tmp_path, image_server, drain_prefect_clients):
    """What an operator's Sunday looks like, on a real server with process workers on both pools:
    `cloob deploy` of a url/caption table spec (warm starts from the champion), then the retrain
    deployment run as its schedule runs it, while the table on 127.0.0.1 grows.
    Run 1 prepares, trains from scratch (no champion yet) and sets the champion; run 2 on unchanged data
    requests nothing, trains nothing, promotes nothing; run 3, after 32 rows were appended and 4 taken
    down, requests only the new rows, makes version 2, trains warm-started from the champion, evaluates
    and decides by the numbers; a manual run of a model made worse on purpose is not promoted, and the
    schedule's next run (the deployment's own parameters) still works."""
    import torch
    import yaml as _yaml
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.deploy as deploy
    from cloob.data.shards import list_shards
    from cloob.data.stream import ShardStream
    from cloob.registry import Registry
    from cloob.results.table import read_rows
    from flows.summary import SUMMARY_ARTIFACT

    url = gpu_workers["url"]
    store = tmp_path / "store"
    table = tmp_path / "weekly.tsv"
    _table(table, image_server.url, range(96))
    spec = tmp_path / "weekly.yaml"
    spec.write_text(_yaml.safe_dump({
        "name": "weekly", "source": {"kind": "table", "path": str(table)},
        "download": {"image_size": 64, "shard_size": 32, "processes": 1, "threads": 1, "timeout": 5, "deadline": 20,
                     "retries": 0}}))
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert deploy.main(["--store", str(store), "--spec", str(spec), "--recipe", "tiny", "--downstream", "shapes",
                            "--cpu-pool", CPU_TEST_POOL, "--gpu-pool", GPU_TEST_POOL, "--no-schedule",
                            "--init-from", "champion", "--worker-wait-s", "300",
                            "--override", "train.steps=30", "--override", "train.batch_size=16",
                            "--override", "data.workers=0", "--override", "data.shuffle_buffer=32",
                            "--override", "schedule.warmup_steps=2"]) == 0
    logs = dict(gpu_workers["logs"], cpu=tmp_path / "cpu-worker.log")
    env = _clean_env(PREFECT_API_URL=url, OMP_NUM_THREADS="1", PREFECT_WORKER_QUERY_SECONDS="1")
    with open(logs["cpu"], "w") as log:
        cpu = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", CPU_TEST_POOL, "--type",
                                "process", "--name", "cpu"], cwd=tmp_path, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    reg = Registry(str(store / "registry"))

    def summary(client) -> str:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_ARTIFACT])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)[0].data

    try:
        with SyncPrefectClient(api=url) as client:
            # Run 1: all 96 rows fetched; from scratch (init_from=champion, none yet); the first champion.
            run1 = _run_deployment(client, "cloob-pipeline/retrain", logs)
            assert _fetched(image_server) == list(range(96))
            [first] = reg.entries()
            assert first["data_version"] == "weekly-v1" and first["parent"] is None
            assert reg.aliases()["champion"] == first["id"]
            assert run1.name == "cloob-pipeline: weekly-v1" and "data-version:v1" in run1.tags
            assert "trained from scratch" in summary(client) and "promoted to champion (no champion yet)" in summary(client)

            # Run 2, unchanged: not one request, nothing trained or promoted.
            _run_deployment(client, "cloob-pipeline/retrain", logs)
            assert _fetched(image_server) == []
            assert len(reg.entries()) == 1 and len(reg.alias_history("champion")) == 1
            assert "No change since version 1 of weekly" in summary(client)

            # The week's delta: 32 rows appended, 4 taken down.
            _table(table, image_server.url, [*range(4, 96), *range(96, 128)])
            run3 = _run_deployment(client, "cloob-pipeline/retrain", logs)
            assert _fetched(image_server) == list(range(96, 128))  # only the new rows
            assert run3.name == "cloob-pipeline: weekly-v2-plus32" and "data-version:v2" in run3.tags
            second = next(e for e in reg.entries() if e["id"] != first["id"])
            assert second["data_version"] == "weekly-v2" and second["parent"]["id"] == first["id"]
            text = summary(client)
            assert "| weekly | v2 | " in text and "warm-started from champion" in text, text
            # Decided on the table's numbers: champion moves only if the mean gain is positive.
            decision = (reg.alias_history("champion") + reg.alias_history("challenger"))[-1]["decision"]
            rows = {r["checkpoint_id"]: r["main_value"] for r in read_rows(str(store / "results")).to_pylist()}
            assert [(s["challenger"], s["champion"]) for s in decision["sets"]] == [(rows[second["id"]],
                                                                                     rows[first["id"]])]
            won = rows[second["id"]] > rows[first["id"]]
            assert reg.aliases()["champion"] == (second["id"] if won else first["id"])
            champion = reg.aliases()["champion"]
            # The rows taken down are not read in training on version 2.
            recipe = _yaml.safe_load((Path(second["run_dir"]) / "recipe.yaml").read_text())
            s = list_shards(f"{store / 'datasets' / 'weekly'}@v2")
            assert (recipe["data"]["version"], recipe["data"]["content_hash"]) == ("weekly-v2", s.content_hash)
            stream = ShardStream(s.urls, batch_size=1, image_transform=lambda im: torch.zeros(1), tokenizer=lambda t: t, seed=0,
                                 resampled=False, shuffle_buffer=1, exclude_keys=s.exclude_keys,
                                 expected_counts=dict(zip(s.urls, s.counts)))
            read = []
            for b in stream:  # one pass of version 2 (the stream goes on into the next)
                read.append(int(b["text"][0].split(":")[0][4:]))
                if len(read) == s.num_samples:
                    break
            assert sorted(read) == list(range(4, 128))

            # A person's run of a model made worse on purpose (1 step from scratch), with a rule that
            # wants a real gain (the interval's lower end 2 points up): not promoted, the champion stays.
            worse = _run_deployment(client, "cloob-pipeline/retrain", logs, {
                "overrides": ["train.steps=1", "train.batch_size=16", "data.workers=0", "data.shuffle_buffer=32",
                              "schedule.warmup_steps=1"], "init_from": None, "require_significant": True, "min_gain": 0.02})
            assert worse.state.is_completed()
            third = reg.resolve("latest")
            assert third["id"] not in (first["id"], second["id"]) and third["parent"] is None
            assert reg.aliases()["champion"] == champion and reg.aliases()["challenger"] == third["id"]
            assert "not promoted" in summary(client)
            # ... and the schedule's next run, with the deployment's own parameters, is a quiet no-op.
            _run_deployment(client, "cloob-pipeline/retrain", logs)
            assert _fetched(image_server) == [] and reg.aliases()["champion"] == champion
            assert "No change since version 2 of weekly" in summary(client)
    finally:
        os.killpg(cpu.pid, 15)
        try:
            cpu.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(cpu.pid, 9)
            cpu.wait()


def test_the_scheduled_retrain_restarts_crashed_runs_as_deployed(capsys, monkeypatch):
    """--train-retries becomes the retrain's train_retries (without it, the flow's default applies);
    a negative count is refused at deploy time."""
    argv = ("--store", "s3://b/x", "--spec", "demo", "--json")
    rc, out, err = _dry_run(capsys, monkeypatch, *argv, "--train-retries", "5")
    assert rc == 0, err
    params = {d["name"]: d for d in json.loads(out)["deployments"]}["cloob-pipeline/retrain"]["parameters"]
    assert params["train_retries"] == 5
    rc, out, err = _dry_run(capsys, monkeypatch, *argv)
    assert "train_retries" not in {d["name"]: d for d in json.loads(out)["deployments"]}["cloob-pipeline/retrain"]["parameters"]
    rc, out, err = _dry_run(capsys, monkeypatch, *argv, "--train-retries", "-1")
    assert rc == 2 and "--train-retries -1 is negative" in err and "\n  fix: " in err
