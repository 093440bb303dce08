"""`cloob deploy` without a server: the plan --dry-run prints (the five deployments, the Kubernetes
job variables rendered the way Prefect's worker renders them, the schedule's parameters), the
refusals with their fixes, and the error when no server is reachable.

The rest of the deployment tests, by subject: test_deploy_server.py (deployments made on a real
Prefect server), test_gpu_pool.py (runs taken by GPU-pool process workers), test_weekly_retrain.py
(the scheduled retrain on both pools), test_k8s_node.py (flows.k8s_node), test_k8s_template.py,
test_compose.py and test_docker_images.py."""

import copy
import json
import shlex
from pathlib import Path

import pytest
import yaml

from tests.prefect_stack import FAKE_SECRET, free_port

ROOT = Path(__file__).parents[1]
TEMPLATE = ROOT / "deploy" / "k8s" / "gpu-job-template.json"


# The Kubernetes worker's rendering of the job template (the template's own tests: test_k8s_template.py).


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
    from flows.cli import main as cloob_main

    def no_server(*a, **k):
        raise AssertionError("a dry run contacted the server")

    monkeypatch.setattr(deploy, "check_server", no_server)
    monkeypatch.setattr(deploy, "apply_plan", no_server)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-key-id")
    rc = cloob_main(["deploy", "--dry-run", *argv])
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


# ----------------------------------------------------------------------------------- no server

def test_deploy_without_a_reachable_server_says_how_to_start_one(capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.deploy as deploy
    from flows.cli import main as cloob_main

    monkeypatch.setattr(deploy, "apply_plan", lambda plan: pytest.fail("deployed without a server"))
    argv = ["--store", "s3://b/x", "--spec", "demo"]
    closed = f"http://127.0.0.1:{free_port()}/api"
    # Unset: Prefect would fall back to a temporary server that vanishes with the command.
    for settings, problem in (({"restore_defaults": {PREFECT_API_URL}}, "PREFECT_API_URL is not set"),
                              ({"updates": {PREFECT_API_URL: closed}}, f"server at {closed} is not reachable")):
        with temporary_settings(**settings):
            assert cloob_main(["deploy", *argv]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and problem in err, err
        assert "fix: start one (`PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start`" in err
        assert "docker/compose.yaml" in err
        assert "PREFECT_API_URL=" in err and out == ""
