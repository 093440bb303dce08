"""deploy/k8s: the Kubernetes job template rendered the way Prefect's Kubernetes worker renders it, its
pods' grace period, the headless rendezvous Service, the worker's own checks and secrets by reference."""

import copy
import json
import os
import re
import shlex
import tempfile
from pathlib import Path

# Before Prefect is imported (as in test_flows.py): its settings are read once.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import yaml  # noqa: E402

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"
TEMPLATE = ROOT / "deploy" / "k8s" / "gpu-job-template.json"
SERVICE = ROOT / "deploy" / "k8s" / "rdzv-service.yaml"
FAKE_SECRET = "fake-secret-d41d8cd98f00b204"  # must never leave the environment


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


def test_k8s_template_renders_an_indexed_multi_node_gpu_job():
    config = _render({"image": "reg/cloob-gpu:1", "nnodes": 3, "gpus_per_node": 4, "namespace": "ml",
                      "env": {"NCCL_DEBUG": "INFO"}})
    job = config["job_manifest"]
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == "ml" == config["namespace"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0  # one failing node fails the run; the Job stops the others
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "reg/cloob-gpu:1" and c["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert c["command"] == ["tini", "--", "python", "-m", "flows.k8s_node"]
    assert c["args"] == ["prefect", "flow-run", "execute"]  # node 0 execs this: the flow run
    env = _env(c)
    assert env["CLOOB_RDZV_ENDPOINT"]["value"] == "$(JOB_NAME)-0.cloob-train:29400"
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    names = [e["name"] for e in c["env"]]
    assert names.index("JOB_NAME") < names.index("CLOOB_RDZV_ENDPOINT")  # $(VAR) expands only earlier ones
    assert env["CLOOB_K8S_SHAPE"]["value"] == "3x4"
    assert env["NCCL_DEBUG"]["value"] == "INFO" and env["PREFECT__FLOW_RUN_ID"]["value"]
    # Kubernetes wants strings in env values (a bare "{{ nnodes }}" would render as a number).
    assert all(isinstance(e["value"], str) for e in c["env"] if "value" in e)
    # /dev/shm in memory for the DataLoader workers.
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert "{{" not in json.dumps(config)


def test_k8s_pods_have_time_to_save_a_checkpoint_when_deleted():
    """A deleted pod gets SIGTERM, then SIGKILL after terminationGracePeriodSeconds: longer than the
    ranks' save (train.stop_grace_s) plus the launcher's wait for torchrun, not Kubernetes' 30 s."""
    from cloob.config import TrainConfig
    from cloob.run import launch

    pod = _render({"image": "x"})["job_manifest"]["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert isinstance(grace, int) and grace > TrainConfig().stop_grace_s + launch._TORCHRUN_EXIT_S
    pod = _render({"image": "x", "termination_grace_period_seconds": 900})["job_manifest"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900


def test_k8s_template_pods_are_found_by_the_headless_rendezvous_service():
    config = _render({"image": "x", "nnodes": 2})
    pod = config["job_manifest"]["spec"]["template"]
    svc = yaml.safe_load(SERVICE.read_text())
    assert svc["kind"] == "Service" and svc["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == svc["metadata"]["name"]  # DNS records need subdomain == Service name
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
    port = json.loads(TEMPLATE.read_text())["variables"]["properties"]["rdzv_port"]["default"]
    assert svc["spec"]["ports"][0]["port"] == port == pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    endpoint = _env(pod["spec"]["containers"][0])["CLOOB_RDZV_ENDPOINT"]["value"]
    assert endpoint.endswith(f".{svc['metadata']['name']}:{port}")


def test_k8s_template_passes_the_kubernetes_workers_checks():
    """prefect-kubernetes' KubernetesWorkerJobConfiguration validators compare the manifest with its
    _get_base_job_manifest(): every path there must exist ("add" ops) with the same value ("replace" ops)."""
    import jsonpatch

    base = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"labels": {}},
            "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                           "containers": [{"name": "prefect-job"}]}}}}
    manifest = _render({"image": "x", "nnodes": 4})["job_manifest"]
    manifest["metadata"].setdefault("labels", {})  # the worker's own validator adds an empty one
    ops = jsonpatch.JsonPatch.from_diff(manifest, base)
    assert [op for op in ops if op["op"] in ("add", "replace")] == []
    # And the server's check: every placeholder in job_configuration is a declared variable.
    from prefect.utilities.templating import find_placeholders

    template = json.loads(TEMPLATE.read_text())
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    assert used <= set(template["variables"]["properties"])
    assert {"image", "namespace", "env", "command", "nnodes", "gpus_per_node"} <= used


def test_k8s_template_takes_secrets_by_reference_only():
    config = _render({"image": "x", "s3_secret_name": "my-s3"})
    text = json.dumps(config)
    assert FAKE_SECRET not in text
    env = _env(config["job_manifest"]["spec"]["template"]["spec"]["containers"][0])
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "my-s3", "key": name, "optional": True}
    template = json.loads(TEMPLATE.read_text())
    for v in template["variables"]["properties"].values():  # no default that could hold a credential
        assert not re.search(r"(?i)secret_access|password", json.dumps(v.get("default")))


def test_k8s_entrypoint_and_tini_are_in_the_gpu_image():
    c = _render({"image": "x"})["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][0] == "tini" and "tini" in (DOCKER / "Dockerfile.gpu").read_text()
    assert (ROOT / "flows" / "k8s_node.py").is_file() and "COPY flows" in (DOCKER / "Dockerfile.gpu").read_text()
