"""deploy/k8s: the Kubernetes job template rendered by the real worker's code, offline, and checked
against Kubernetes' own schema.

prefect-kubernetes' `KubernetesWorkerJobConfiguration.from_template_and_values` (what the worker runs
for each flow run: variable defaults, the deployment's job variables, the `env` merge, the worker's
manifest validator) and `prepare_for_flow_run` (Prefect's env, labels, the command split into args,
the SIGTERM behaviour), with PREFECT_API_URL on a port nothing listens on: this template has no block
or variable references, so nothing is asked of an API. The job variables are those `cloob deploy
--k8s` sets (its `--dry-run --json` output). Then `kubernetes_validate` checks the Job and the
rendezvous Service against the Kubernetes 1.27 (the oldest the template supports) and the newest
bundled schemas."""

import asyncio
import copy
import json
import re
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"
TEMPLATE = ROOT / "deploy" / "k8s" / "gpu-job-template.json"
SERVICE = ROOT / "deploy" / "k8s" / "rdzv-service.yaml"
FAKE_SECRET = "fake-secret-d41d8cd98f00b204"  # must never leave the environment
API = "http://prefect-server.prefect.svc:4200/api"  # the worker's API, as pods see it
OLDEST = "1.27"  # batch.kubernetes.io/job-name (the JOB_NAME fieldRef) is a label since 1.27
SIGTERM_BEHAVIOR = "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _render(job_variables: dict, template: dict | None = None, flow_run_id: str | None = None):
    """The KubernetesWorkerJobConfiguration the Kubernetes worker makes for a flow run of a deployment
    with these job variables (its job_manifest is the Job it creates)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    run = FlowRun(id=uuid.UUID(flow_run_id) if flow_run_id else uuid.uuid4(), name="brave-otter",
                  flow_id=uuid.uuid4())
    # The worker's own settings go into every pod's env (PREFECT_API_URL among them). A port nothing
    # listens on: from_template_and_values would ask the API only to resolve block references.
    with temporary_settings(updates={PREFECT_API_URL: API}):
        config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
            copy.deepcopy(template or _template()), job_variables))
        config.prepare_for_flow_run(flow_run=run)
    return config


def _container(config) -> dict:
    (c,) = config.job_manifest["spec"]["template"]["spec"]["containers"]
    return c


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container["env"]}


def _named(manifest: dict) -> dict:
    """A copy with metadata.name: kubernetes_validate needs one, and a Prefect Job has only
    generateName (the API server makes the name)."""
    m = copy.deepcopy(manifest)
    m["metadata"].setdefault("name", m["metadata"].get("generateName", "x-") + "abcde")
    return m


@pytest.fixture(scope="module")
def deployed() -> dict:
    """{"train": ..., "eval": ...}: the job variables `cloob deploy --k8s --nnodes 2 --gpus-per-node 8
    --eval-on gpu --dry-run --json` gives cloob-train/gpu and evaluate-checkpoints/gpu."""
    import contextlib
    import io

    import flows.deploy as deploy
    from flows.cli import main as cloob_main

    mp = pytest.MonkeyPatch()

    def no_server(*a, **k):
        raise AssertionError("a dry run contacted the server")

    mp.setattr(deploy, "check_server", no_server)
    mp.setattr(deploy, "apply_plan", no_server)
    mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    mp.setenv("AWS_ACCESS_KEY_ID", "fake-key-id")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = cloob_main(["deploy", "--dry-run", "--store", "s3://bucket/cloob", "--spec", "demo", "--k8s", "--image",
                              "reg/cloob-gpu:7", "--nnodes", "2", "--gpus-per-node", "8", "--eval-on", "gpu",
                              "--json"])
    finally:
        mp.undo()
    assert rc == 0
    d = {x["name"]: x for x in json.loads(out.getvalue())["deployments"]}
    assert FAKE_SECRET not in out.getvalue()
    return {"train": d["cloob-train/gpu"]["job_variables"], "eval": d["evaluate-checkpoints/gpu"]["job_variables"]}


# ----------------------------------------------------------------------------------- the worker's rendering

def test_k8s_template_renders_an_indexed_multi_node_gpu_job():
    config = _render({"image": "reg/cloob-gpu:1", "nnodes": 3, "gpus_per_node": 4, "namespace": "ml",
                      "env": {"NCCL_DEBUG": "INFO"}})
    job = config.job_manifest
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "ml" == config.namespace
    assert job["metadata"]["generateName"] == "brave-otter-"  # the worker names the Job after the flow run
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0  # one failing node fails the run; the Job stops the others
    pod = spec["template"]["spec"]
    c = _container(config)
    assert c["image"] == "reg/cloob-gpu:1" and c["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert c["command"] == ["tini", "--", "python", "-m", "flows.k8s_node"]
    assert c["args"] == ["prefect", "flow-run", "execute"]  # node 0 execs this: the flow run
    env = _env(c)
    assert env["CLOOB_RDZV_ENDPOINT"]["value"] == "$(JOB_NAME)-0.cloob-train:29400"
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names))
    assert names.index("JOB_NAME") < names.index("CLOOB_RDZV_ENDPOINT")  # $(VAR) expands only earlier ones
    assert env["CLOOB_K8S_SHAPE"]["value"] == "3x4"
    assert env["PREFECT_API_URL"]["value"] == API and env["PREFECT__FLOW_RUN_ID"]["value"]
    # The deployment's env is merged over the template's default, not in place of it.
    assert env["NCCL_DEBUG"]["value"] == "INFO" and env[SIGTERM_BEHAVIOR]["value"] == "reschedule"
    # Kubernetes wants strings in env values (a bare "{{ nnodes }}" would render as a number).
    assert all(isinstance(e["value"], str) for e in c["env"] if "value" in e)
    # /dev/shm in memory for the DataLoader workers.
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # The flow run's labels reach the pods too (the worker finds its pod by them).
    assert pod and spec["template"]["metadata"]["labels"]["prefect.io/flow-run-id"] == str(env["PREFECT__FLOW_RUN_ID"]
                                                                                             ["value"])
    assert "{{" not in json.dumps(job)


@pytest.mark.parametrize("case", ["train", "eval", "defaults"])
def test_k8s_template_renders_valid_kubernetes_jobs_for_what_cloob_deploy_sets(deployed, case):
    """The Job the worker would create for each deployment `cloob deploy --k8s` makes, and for the
    template's defaults, is a valid batch/v1 Job for Kubernetes 1.27 and the newest schema bundled."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version, major_minor

    variables = {"defaults": {"image": "reg/cloob-gpu:7"}}.get(case) or deployed[case]
    nnodes, gpus = {"train": (2, 8), "eval": (1, 1), "defaults": (1, 1)}[case]
    config = _render(variables)
    job = config.job_manifest
    assert (job["spec"]["parallelism"], _container(config)["resources"]["limits"]["nvidia.com/gpu"]) == (nnodes, gpus)
    assert _env(_container(config))["CLOOB_K8S_SHAPE"]["value"] == f"{nnodes}x{gpus}"
    for version in (OLDEST, major_minor(latest_version())):
        assert kubernetes_validate.validate(_named(job), version, strict=False) == version


def test_k8s_templates_only_strict_schema_complaint_is_the_pod_spec_counts_prefects_validator_wants(deployed):
    """Strict validation (no unknown fields) fails on exactly one thing: `parallelism: 1` and
    `completions: 1` inside the pod spec, which Kubernetes' PodSpec does not have and prefect-kubernetes'
    validator requires there (its own default template has them too). Without those two the Job
    passes strict validation: nothing else in it is unknown to Kubernetes. (deploy/k8s/README.md)"""
    import kubernetes_validate
    from kubernetes_validate import ValidationError

    job = _named(_render(deployed["train"]).job_manifest)
    with pytest.raises(ValidationError) as e:
        kubernetes_validate.validate(job, OLDEST, strict=True)
    assert list(e.value.path) == ["spec", "template", "spec"] and "'completions', 'parallelism'" in e.value.message
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    assert kubernetes_validate.validate(job, OLDEST, strict=True) == OLDEST
    # and the check can fail: a misspelt field of ours would be caught.
    job["spec"]["template"]["spec"]["terminationGracePeriod"] = 180
    with pytest.raises(ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(job, OLDEST, strict=True)


def test_k8s_rendezvous_service_is_a_valid_service():
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version, major_minor

    svc = yaml.safe_load(SERVICE.read_text())
    for version in (OLDEST, major_minor(latest_version())):
        assert kubernetes_validate.validate(svc, version, strict=True) == version


def test_k8s_template_passes_the_kubernetes_workers_own_validator_which_can_fail():
    """from_template_and_values runs the worker's manifest validator (KubernetesWorkerJobConfiguration.
    _validate_job_manifest); a template without what it requires is refused, so the renders above
    passed it. And the server's check: every placeholder in job_configuration is a declared variable."""
    from prefect.utilities.templating import find_placeholders

    broken = _template()
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    with pytest.raises(ValueError, match="restartPolicy must have value 'Never'"):
        _render({"image": "x"}, template=broken)
    template = _template()
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    assert used <= set(template["variables"]["properties"])
    assert {"image", "namespace", "env", "command", "nnodes", "gpus_per_node", "annotations"} <= used


def test_k8s_template_has_the_variables_of_prefects_default_it_can_honour():
    """prefect-kubernetes' default template's variables are ours too, except backoff_limit (fixed at 0:
    a multi-node run cannot go on without one of its pods) and cluster_config (a block: the worker's
    in-cluster or kubeconfig credentials are used). deploy/k8s/README.md says why."""
    from prefect_kubernetes.worker import KubernetesWorkerVariables

    ours = set(_template()["variables"]["properties"])
    default = set(KubernetesWorkerVariables.model_json_schema()["properties"])
    assert default - ours == {"backoff_limit", "cluster_config"}
    config = _render({"image": "x", "annotations": {"example.com/team": "vision"}, "cpu_limit": "16",
                      "memory_limit": "64Gi"})
    assert config.job_manifest["metadata"]["annotations"] == {"example.com/team": "vision"}
    assert config.job_manifest["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "vision"}
    assert _container(config)["resources"]["limits"] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": 1}


def test_k8s_template_sets_the_sigterm_behaviour_itself_whatever_a_deployment_adds():
    """PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule is in the template, not only what
    prefect-kubernetes adds for backoffLimit 0: a deployment's env keeps it, and there is one entry."""
    assert _template()["variables"]["properties"]["env"]["default"] == {SIGTERM_BEHAVIOR: "reschedule"}
    for env in ({}, {"NCCL_DEBUG": "WARN"}):
        c = _container(_render({"image": "x", **({"env": env} if env else {})}))
        assert [e["value"] for e in c["env"] if e["name"] == SIGTERM_BEHAVIOR] == ["reschedule"]


def test_k8s_pods_have_time_to_save_a_checkpoint_when_deleted():
    """A deleted pod gets SIGTERM, then SIGKILL after terminationGracePeriodSeconds: longer than the
    ranks' save (train.stop_grace_s) plus the launcher's wait for torchrun, not Kubernetes' 30 s."""
    from cloob.config import TrainConfig
    from cloob.run import launch

    pod = _render({"image": "x"}).job_manifest["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert isinstance(grace, int) and grace > TrainConfig().stop_grace_s + launch._TORCHRUN_EXIT_S
    pod = _render({"image": "x", "termination_grace_period_seconds": 900}).job_manifest["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900


def test_k8s_template_pods_are_found_by_the_headless_rendezvous_service():
    config = _render({"image": "x", "nnodes": 2})
    pod = config.job_manifest["spec"]["template"]
    svc = yaml.safe_load(SERVICE.read_text())
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == svc["metadata"]["name"]  # DNS records need subdomain == Service name
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
    port = _template()["variables"]["properties"]["rdzv_port"]["default"]
    assert svc["spec"]["ports"][0]["port"] == port == pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    endpoint = _env(pod["spec"]["containers"][0])["CLOOB_RDZV_ENDPOINT"]["value"]
    assert endpoint.endswith(f".{svc['metadata']['name']}:{port}")


def test_k8s_template_takes_secrets_by_reference_only(monkeypatch):
    # In the rendering process's environment, as in a worker's: it must not reach the Job.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    config = _render({"image": "x", "s3_secret_name": "my-s3"})
    assert FAKE_SECRET not in json.dumps(config.job_manifest)
    env = _env(_container(config))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "my-s3", "key": name, "optional": True}
    for v in _template()["variables"]["properties"].values():  # no default that could hold a credential
        assert not re.search(r"(?i)secret_access|password", json.dumps(v.get("default")))


def test_k8s_entrypoint_and_tini_are_in_the_gpu_image():
    c = _container(_render({"image": "x"}))
    assert c["command"][0] == "tini" and "tini" in (DOCKER / "Dockerfile.gpu").read_text()
    assert (ROOT / "flows" / "k8s_node.py").is_file() and "COPY flows" in (DOCKER / "Dockerfile.gpu").read_text()
