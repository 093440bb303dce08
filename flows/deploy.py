"""`cloob deploy`: the work pools and deployments that run the pipeline on real infrastructure.

    cloob deploy --store s3://bucket/cloob --spec-override source.path=s3://bucket/cc3m.tsv
    cloob deploy --store s3://bucket/cloob --spec-override source.path=s3://bucket/cc3m.tsv
                 --k8s --image REG/cloob-gpu:TAG --nnodes 2 --gpus-per-node 8      (training on Kubernetes)
    cloob deploy --store s3://bucket/cloob --spec demo --dry-run                   (the plan; contacts nothing)

What it creates on the Prefect server named by PREFECT_API_URL:
- work pool `cloob-cpu` (process) with deployments `cloob-pipeline/retrain` (a cron schedule,
  training through `cloob-train/gpu`; with --eval-on gpu, evaluation through
  `evaluate-checkpoints/gpu`), `evaluate-checkpoints/cpu`, and `cloob-study/cluster` (a study,
  flows.study, run on demand: each cell trained through `cloob-train/gpu`, evaluated as the
  pipeline evaluates; `--study NAME` makes that study the default of its run form);
- work pool `cloob-gpu` (process, a worker on a GPU machine) or, with --k8s, `cloob-gpu-k8s`
  (kubernetes, base job template deploy/k8s/gpu-job-template.json: an Indexed Job of `nnodes` pods
  running torchrun together) with deployments `cloob-train/gpu`, at most --train-slots runs at
  once (default 1), and `evaluate-checkpoints/gpu` (one checkpoint x set per run when the pipeline
  fans out; on Kubernetes a one-pod Job with one GPU).

The deployments use module entrypoints (flows.pipeline.pipeline, ...) and no pull steps: the code is
the `cloob` package installed where the worker runs (docker/Dockerfile.cpu, docker/Dockerfile.gpu).
Secrets never go into parameters or job variables (the server stores both in clear): process
workers pass their own environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) to
the flow runs, and Kubernetes pods read them from a Secret (secretKeyRef in the job template).

Prefect is imported only inside the functions: this module is imported by the `cloob` command line
for its parser, and Prefect reads its settings (PREFECT_API_URL, ...) once, when first imported.
"""

from __future__ import annotations

import argparse
import json
import zoneinfo
from pathlib import Path
from typing import Any

import yaml

from cloob.errors import CloobError
from cloob.prepare.distributors import add_cluster_argument
from flows.deploy_checks import check_args, check_names, study_data_overrides

ROOT = Path(__file__).resolve().parents[1]
K8S_TEMPLATE = ROOT / "deploy" / "k8s" / "gpu-job-template.json"
K8S_SERVICE = ROOT / "deploy" / "k8s" / "rdzv-service.yaml"

CPU_POOL = "cloob-cpu"
GPU_POOL = "cloob-gpu"
GPU_POOL_K8S = "cloob-gpu-k8s"
# flows.pipeline's flow names; train_flow's deployment is what pipeline(train_deployment=...) runs.
PIPELINE = ("cloob-pipeline", "retrain")
EVALUATE = ("evaluate-checkpoints", "cpu")
EVALUATE_GPU = ("evaluate-checkpoints", "gpu")
EVAL_GPU_DEPLOYMENT = "/".join(EVALUATE_GPU)
TRAIN = ("cloob-train", "gpu")
STUDY = ("cloob-study", "cluster")
TRAIN_DEPLOYMENT = "/".join(TRAIN)

DEFAULT_SPECS = ["cc3m"]
DEFAULT_RECIPES = ["cloob_rn50_cc3m", "clip_rn50_cc3m"]
# The evaluation sets that prepare themselves (downloads); imagenet needs a folder you supply.
DEFAULT_DOWNSTREAM = ["birdsnap", "country211", "flowers102", "gtsrb", "stanford_cars", "ucf101", "imagenet_v2"]
DEFAULT_CRON = "0 3 * * 0"  # Sundays 03:00

NO_SERVER_FIX = ("start one (`PREFECT_SERVER_ANALYTICS_ENABLED=false prefect server start`, telemetry off, or "
                 "`docker compose -f docker/compose.yaml up -d`, see docker/README.md) and point PREFECT_API_URL at it, e.g. "
                 "`export PREFECT_API_URL=http://127.0.0.1:4200/api`; or look first with --dry-run")


# ------------------------------------------------------------------------------------------ plan

def _schedules(args) -> list:
    from prefect.schedules import Cron

    if args.no_schedule:
        return []
    try:
        zoneinfo.ZoneInfo(args.timezone)  # Prefect checks it only later, deep inside pydantic
        return [Cron(args.cron, timezone=args.timezone)]
    except (ValueError, zoneinfo.ZoneInfoNotFoundError) as e:
        raise CloobError(f"schedule --cron {args.cron!r} --timezone {args.timezone!r}: {e}".splitlines()[0].rstrip(": "),
                         "write five cron fields (minute hour day month weekday), e.g. '0 3 * * 0', and an "
                         "IANA time zone, e.g. UTC or Europe/Vienna") from None


def build_plan(args) -> dict[str, Any]:
    """Work pools and deployments (prefect RunnerDeployment objects), without contacting a server."""
    from prefect.types.entrypoint import EntrypointType

    from flows.pipeline import evaluate_flow, pipeline, train_flow
    from flows.study import study_flow

    gpu_pool = args.gpu_pool or (GPU_POOL_K8S if args.k8s else GPU_POOL)
    gpu_type = "kubernetes" if args.k8s else "process"
    if gpu_pool == args.cpu_pool:
        raise CloobError(f"--cpu-pool and --gpu-pool are both {gpu_pool!r}",
                         "give training a pool of its own: its workers are the GPU machines")
    common = dict(entrypoint_type=EntrypointType.MODULE_PATH, tags=["cloob"])
    pipeline_params = {
        "store": args.store, "specs": args.spec, "recipes": args.recipe, "downstream": args.downstream,
        "overrides": list(args.override or []), "spec_overrides": list(args.spec_override or []),
        # One process per GPU of a node; with --k8s the pods have --gpus-per-node GPUs each.
        "nproc_per_node": args.gpus_per_node, "train_deployment": TRAIN_DEPLOYMENT,
        "eval_deployment": EVAL_GPU_DEPLOYMENT if args.eval_on == "gpu" else None,
        **({"cluster": args.cluster} if args.cluster else {}),
        **({"worker_wait_s": args.worker_wait_s} if args.worker_wait_s is not None else {}),
        **({"train_retries": _retries(args.train_retries)} if args.train_retries is not None else {}),
        **({"init_from": args.init_from} if args.init_from else {}),
        **promotion_params(args),
    }
    study_params = {
        "store": args.store, "train_deployment": TRAIN_DEPLOYMENT, "nproc_per_node": args.gpus_per_node,
        "eval_deployment": pipeline_params["eval_deployment"], "data_overrides": study_data_overrides(args),
        **({"study": args.study} if args.study else {}),
        **{k: pipeline_params[k] for k in ("cluster", "worker_wait_s") if k in pipeline_params},
    }
    train_jobvars: dict[str, Any] = {}
    eval_jobvars: dict[str, Any] = {}
    if args.k8s:
        train_jobvars = {"image": args.image, "namespace": args.namespace, "nnodes": args.nnodes,
                         "gpus_per_node": args.gpus_per_node, "s3_secret_name": args.s3_secret}
        # An evaluation is one process on one GPU: a Job of one pod.
        eval_jobvars = {**train_jobvars, "nnodes": 1, "gpus_per_node": 1}
    deployments = [
        pipeline.to_deployment(
            PIPELINE[1], work_pool_name=args.cpu_pool, parameters=pipeline_params, schedules=_schedules(args),
            # Two pipelines on one store would prepare and train the same things at once: queue them.
            concurrency_limit=1,
            description="Retraining: specs -> shards -> training on the GPU pool -> registry -> zero-shot "
                        "evaluation -> results. Preparation runs on this (CPU) pool, and evaluation "
                        + ("on the GPU pool, one run per checkpoint x set." if args.eval_on == "gpu" else "too."),
            **common),
        evaluate_flow.to_deployment(
            EVALUATE[1], work_pool_name=args.cpu_pool, parameters={"store": args.store},
            description="Evaluate checkpoints on downstream sets; rows go to <store>/results.", **common),
        evaluate_flow.to_deployment(
            EVALUATE_GPU[1], work_pool_name=gpu_pool, job_variables=eval_jobvars, parameters={"store": args.store},
            # No limit of its own: runs spread over the GPU workers, each taking one run at a time
            # (`prefect worker start --limit 1`), so an evaluation never shares a GPU with a training.
            description="Evaluate checkpoints on downstream sets on a GPU; the pipeline (--eval-on gpu) starts "
                        "one run per checkpoint x set. Rows go to <store>/results.", **common),
        study_flow.to_deployment(
            STUDY[1], work_pool_name=args.cpu_pool, parameters=study_params,
            # Two runs of one study would train the same cells at once: queue them.
            concurrency_limit=1,
            description="A study (seeds, methods, sweeps; cloob/studies/*.yaml or a YAML path): every cell "
                        "trained on the GPU pool, evaluated at the study's steps "
                        + ("on the GPU pool" if args.eval_on == "gpu" else "on this (CPU) pool")
                        + "; the report goes to <store>/studies/<name>/ and the artifact study-<name>.", **common),
        train_flow.to_deployment(
            TRAIN[1], work_pool_name=gpu_pool, job_variables=train_jobvars,
            parameters={"nproc_per_node": args.gpus_per_node, "nnodes": args.nnodes},
            # --train-slots trainings at a time on the GPU pool (default 1); more runs wait (Prefect's
            # default ENQUEUE). The pipeline trains one recipe after another anyway; a study's cells
            # spread over the slots.
            concurrency_limit=args.train_slots,
            description="One training run under torchrun (node 0 of nnodes); checkpoints go to the "
                        "recipe's train.output (the pipeline sets it to the store).", **common),
    ]
    pools = [{"name": args.cpu_pool, "type": "process"}, {"name": gpu_pool, "type": gpu_type}]
    if args.k8s:
        pools[1]["base_job_template"] = str(K8S_TEMPLATE)
    return {"pools": pools, "deployments": deployments}


def _describe_deployment(d) -> dict[str, Any]:
    return {
        "name": d.full_name,
        "entrypoint": d.entrypoint,
        "work_pool": d.work_pool_name,
        "parameters": d.parameters,
        "job_variables": d.job_variables,
        "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                      for s in d.schedules or []],
        "concurrency_limit": d.concurrency_limit,
        "tags": d.tags,
    }


def _retries(n: int) -> int:
    if n < 0:
        raise CloobError(f"--train-retries {n} is negative", "give 0 (no retry) or more, e.g. 2")
    return n


def promotion_params(args) -> dict:
    """The pipeline's promotion parameters that were given (the others keep the flow's defaults), checked
    here so that a rule that cannot work is refused at deploy time, not on Sunday."""
    if args.promote_on and args.downstream and (missing := sorted(set(args.promote_on) - set(args.downstream))):
        raise CloobError(f"--promote-on {' '.join(missing)}: not among the --downstream sets "
                         f"({', '.join(args.downstream)}), so no run would evaluate it",
                         "add it with --downstream, or promote on sets the pipeline evaluates")
    if args.min_gain is not None and not 0 <= args.min_gain < 1:
        raise CloobError(f"--min-gain {args.min_gain} is not a fraction in [0, 1)", "give e.g. 0.01 for one point")
    if args.confidence is not None and not 0 < args.confidence < 1:
        raise CloobError(f"--confidence {args.confidence} is not in (0, 1)", "give e.g. 0.95")
    if args.approval_timeout_s is not None and args.approval_timeout_s <= 0:
        raise CloobError(f"--approval-timeout-s {args.approval_timeout_s} is not positive", "give seconds, e.g. 86400")
    given = {"promote_on": args.promote_on, "min_gain": args.min_gain, "confidence": args.confidence,
             "approval_timeout_s": args.approval_timeout_s,
             "require_significant": args.require_significant or None, "approval": args.approval or None}
    return {k: v for k, v in given.items() if v is not None}


def _pool_command(pool: dict) -> str:
    cmd = f"prefect work-pool create {pool['name']} --type {pool['type']}"
    if pool.get("base_job_template"):
        cmd += f" --base-job-template {_rel(pool['base_job_template'])}"
    return cmd


def _rel(path: str | Path) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def describe(plan: dict) -> dict[str, Any]:
    """The plan as plain data (what --dry-run prints)."""
    return {
        "work_pools": [{**p, **({"base_job_template": _rel(p["base_job_template"])} if "base_job_template" in p
                                else {}), "create": _pool_command(p)} for p in plan["pools"]],
        "deployments": [_describe_deployment(d) for d in plan["deployments"]],
    }


def next_steps(plan: dict, args) -> list[str]:
    cpu, gpu = plan["pools"]
    steps = [f"CPU worker: prefect worker start --pool {cpu['name']} --type process "
             "(with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL in its environment for an s3:// store)"]
    if gpu["type"] == "kubernetes":
        ns = args.namespace
        steps += [
            f"rendezvous Service (once): kubectl apply -n {ns} -f {_rel(K8S_SERVICE)}",
            f"S3 credentials (once): kubectl create secret generic {args.s3_secret} -n {ns} "
            "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=... "
            "[--from-literal=AWS_ENDPOINT_URL=...]",
            f"Kubernetes worker (in the cluster, with prefect-kubernetes installed): "
            f"prefect worker start --pool {gpu['name']} --type kubernetes",
        ]
    else:
        steps.append(f"GPU worker, on each GPU machine: prefect worker start --pool {gpu['name']} --type process "
                     "--limit 1 (one run at a time: a training and an evaluation never share the GPU)")
    steps.append(f"a run now: prefect deployment run {'/'.join(PIPELINE)}")
    study = "" if args.study else " -p study=cloob_vs_clip_cc3m"
    steps.append(f"a study: prefect deployment run {'/'.join(STUDY)}{study} (report: <store>/studies/<name>/study.md)")
    return steps


# ------------------------------------------------------------------------------------------ apply

def check_server() -> str:
    """The API URL of a reachable Prefect server, or CloobError saying how to get one."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        # Without it, Prefect would start a temporary server that vanishes with this command.
        raise CloobError("no Prefect server to deploy to: PREFECT_API_URL is not set", NO_SERVER_FIX)
    with get_client(sync_client=True, httpx_settings={"timeout": 10}) as client:
        exc = client.api_healthcheck()
    if exc is not None:
        raise CloobError(f"the Prefect server at {url} is not reachable ({type(exc).__name__}: {exc})",
                         NO_SERVER_FIX)
    return url


def ensure_pool(client, pool: dict) -> str:
    """Create the work pool if missing; an existing one is left as it is. Returns what was done."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    if pool.get("base_job_template"):
        template = json.loads(Path(pool["base_job_template"]).read_text())
    else:
        # What `prefect work-pool create --type process` uses; ProcessWorker ships with prefect.
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
    try:
        existing = client.read_work_pool(pool["name"])
    except ObjectNotFound:
        existing = None
    if existing is not None:
        if existing.type != pool["type"]:
            raise CloobError(f"work pool {pool['name']!r} exists with type {existing.type!r}, not {pool['type']!r}",
                             f"name another pool (--cpu-pool/--gpu-pool), or delete it: "
                             f"prefect work-pool delete {pool['name']}")
        if pool.get("base_job_template") and existing.base_job_template != template:
            # Someone may have edited it in the UI on purpose: say so rather than overwrite it.
            return (f"exists, left unchanged; its job template differs from {_rel(pool['base_job_template'])} "
                    f"(to replace it: prefect work-pool update {pool['name']} --base-job-template "
                    f"{_rel(pool['base_job_template'])})")
        return "exists, left unchanged"
    client.create_work_pool(WorkPoolCreate(name=pool["name"], type=pool["type"], base_job_template=template))
    return "created"


def apply_plan(plan: dict) -> list[tuple[str, str]]:
    """Create the pools and create or update the deployments; [(what, outcome)]."""
    from prefect.client.orchestration import get_client

    done = []
    with get_client(sync_client=True) as client:
        for pool in plan["pools"]:
            done.append((f"work pool {pool['name']} ({pool['type']})", ensure_pool(client, pool)))
    for d in plan["deployments"]:
        try:
            deployment_id = d.apply()
        except Exception as e:  # DeploymentApplyError, HTTP errors: the server's message says why
            raise CloobError(f"deployment {d.full_name} was refused by the server: {e}",
                             "check the Prefect server's version (3.8) and the options given") from None
        done.append((f"deployment {d.full_name} -> {d.work_pool_name}", f"id {deployment_id}"))
    return done


def run(args) -> int:
    args.spec = args.spec or list(DEFAULT_SPECS)
    args.recipe = args.recipe or list(DEFAULT_RECIPES)
    args.downstream = args.downstream or list(DEFAULT_DOWNSTREAM)
    check_args(args)
    check_names(args)
    if not args.dry_run:
        url = check_server()  # before the plan: no server, no point
    plan = build_plan(args)
    if args.dry_run:
        out = {"dry_run": "nothing was created; this is what `cloob deploy` would create",
               **describe(plan), "next_steps": next_steps(plan, args)}
        print(json.dumps(out, indent=2) if args.json else yaml.safe_dump(out, sort_keys=False, width=110), end="")
        return 0
    print(f"Prefect server: {url}")
    for what, outcome in apply_plan(plan):
        print(f"  {what}: {outcome}")
    if not args.no_schedule:
        print(f"  schedule of {'/'.join(PIPELINE)}: cron '{args.cron}' ({args.timezone})")
    print("next:")
    for step in next_steps(plan, args):
        print(f"  - {step}")
    return 0


# ------------------------------------------------------------------------------------------ CLI

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True,
                   help="storage root every worker reaches: s3://bucket/prefix (or an absolute shared folder)")
    p.add_argument("--spec", action="append", metavar="SPEC",
                   help=f"pretraining data spec, repeatable (default: {' '.join(DEFAULT_SPECS)})")
    p.add_argument("--spec-override", action="append", metavar="KEY=VALUE",
                   help="spec override, repeatable, e.g. source.path=s3://bucket/Train_GCC-training.tsv")
    p.add_argument("--recipe", action="append", metavar="'RECIPE [OVERRIDE ...]'",
                   help=f"recipe with its own overrides, repeatable (default: {' '.join(DEFAULT_RECIPES)})")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="override for every recipe, repeatable")
    p.add_argument("--downstream", action="append", metavar="NAME",
                   help="evaluation set, repeatable (default: the seven that download themselves)")
    p.add_argument("--cpu-pool", default=CPU_POOL, help=f"pool of the pipeline and evaluation (default {CPU_POOL})")
    p.add_argument("--gpu-pool", help=f"pool of training (default {GPU_POOL}; with --k8s {GPU_POOL_K8S})")
    p.add_argument("--k8s", action="store_true",
                   help="train on a Kubernetes pool (Indexed Job, multi-node torchrun) instead of a process pool")
    p.add_argument("--image", help="with --k8s: the image built from docker/Dockerfile.gpu")
    p.add_argument("--namespace", default="default", help="with --k8s: namespace of the training jobs")
    p.add_argument("--s3-secret", default="cloob-s3",
                   help="with --k8s: Kubernetes Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY[/AWS_ENDPOINT_URL]")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (training processes) per node (default 1)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes per training run; more than 1 needs --k8s")
    p.add_argument("--train-slots", type=int, default=1, metavar="N",
                   help="trainings the GPU pool runs at once (cloob-train/gpu's concurrency limit; default 1): "
                        "a study's cells spread over them, e.g. one per GPU machine")
    p.add_argument("--eval-on", choices=["cpu", "gpu"], default="cpu",
                   help="where the scheduled pipeline evaluates: in its own run on the CPU pool (default), or "
                        f"one run of {EVAL_GPU_DEPLOYMENT} per checkpoint x set on the GPU pool")
    add_cluster_argument(p, "prepares the data (with --spec-override download.distributor=pyspark or ray; "
                            "for ray, else RAY_ADDRESS in the worker's environment)")
    p.add_argument("--worker-wait-s", type=float, metavar="S",
                   help="how long a training or evaluation run may wait for a GPU worker to take it before the "
                        "scheduled pipeline cancels it and fails, saying so (default 3600)")
    p.add_argument("--train-retries", type=int, metavar="N",
                   help="how many times the scheduled pipeline starts a training or evaluation run again when it "
                        "ends Crashed (a lost node, an OOM-killed pod); it resumes from its last checkpoint "
                        "(default 2; 0: fail at the first crash)")
    p.add_argument("--study", metavar="NAME",
                   help="the study cloob-study/cluster runs by default (cloob/studies: cloob_vs_clip_cc3m, "
                        "ablation_cc3m, ...; or a YAML path the workers see); without it, each run names one")
    p.add_argument("--init-from", metavar="MODEL",
                   help="warm start the scheduled retraining from this registered model (e.g. champion) or "
                        "checkpoint URL (the pipeline's init_from); default: from scratch; a run can set "
                        "-p init_from=champion")
    g = p.add_argument_group("promotion (the scheduled retrain's rule; docs/registry.md, \"Promotion\")")
    g.add_argument("--promote-on", action="append", metavar="SET",
                   help="a set whose main metric decides promotion, repeatable (default: every --downstream set)")
    g.add_argument("--min-gain", type=float, metavar="FRACTION",
                   help="how much a challenger must beat the champion by (0.01: one point; default 0)")
    g.add_argument("--require-significant", action="store_true",
                   help="also require the paired bootstrap interval's lower end above --min-gain")
    g.add_argument("--confidence", type=float, help="the interval's level (default 0.95)")
    g.add_argument("--approval", action="store_true",
                   help="pause each run for a reviewer in the UI before a challenger becomes champion")
    g.add_argument("--approval-timeout-s", type=int, metavar="S",
                   help="how long the pause waits (default 3600); no answer: nothing promoted, the run fails")
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"retraining schedule (default '{DEFAULT_CRON}')")
    p.add_argument("--timezone", default="UTC", help="time zone of --cron (default UTC)")
    p.add_argument("--no-schedule", action="store_true", help="no schedule (removes one set before)")
    p.add_argument("--dry-run", action="store_true", help="print what would be created (YAML) and contact nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: JSON instead of YAML")


def add_deploy_parser(subparsers) -> argparse.ArgumentParser:
    """The `deploy` subcommand, for the `cloob` command line (flows.cli)."""
    p = subparsers.add_parser("deploy", help="work pools and deployments (pipeline on a schedule, evaluation, "
                                             "training on a GPU pool) on a Prefect server")
    _add_arguments(p)
    # own_logging: Prefect's console output stays as Prefect configures it
    p.set_defaults(func=run, own_logging=True)
    return p

