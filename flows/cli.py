"""The installed `cloob` command: cloob.cli's commands plus those that run Prefect flows.

    cloob demo      the whole pipeline on a laptop, under an ephemeral Prefect (nothing to set up)
    cloob study     a study spec as one pipeline run (flows.study)
    cloob deploy    deployments and work pools for a Prefect server (flows.deploy)

Prefect reads its settings once, at import: `demo` sets PREFECT_HOME before anything imports it,
so this module imports Prefect (flows.pipeline) only inside the commands.
"""

from __future__ import annotations

import argparse
import sys

from cloob import cli
from flows.demo import DEFAULT_STEPS  # imports no Prefect at module level
from flows.deploy import add_deploy_parser  # imports no Prefect at module level


def _cmd_demo(args) -> int:
    from flows.demo import run_demo

    return run_demo(args.store, steps=args.steps, samples=args.samples, nproc_per_node=args.nproc_per_node,
                    seeds=args.seeds)


def _cmd_study(args) -> int:
    import os

    from cloob.study.cells import check_cells
    from cloob.study.spec import load_study
    from flows.demo import _use_ephemeral_prefect, store_and_prefect_home

    check_cells(load_study(args.study, args.set or []))  # a bad spec or cell fails here, before Prefect starts
    if (args.train_deployment or args.eval_deployment) and not os.environ.get("PREFECT_API_URL"):
        from cloob.errors import CloobError

        raise CloobError("--train-deployment/--eval-deployment need the Prefect server those deployments are on",
                         "export PREFECT_API_URL=http://<server>:4200/api (see cloob deploy), then run again")
    store, home = store_and_prefect_home(args.store, ".cloob-study")
    if not os.environ.get("PREFECT_API_URL"):  # before Prefect is imported: it reads its settings once
        _use_ephemeral_prefect(home)
    from flows.study import run_study

    return run_study(args.study, store, args.set or [], train_deployment=args.train_deployment,
                     eval_deployment=args.eval_deployment, nproc_per_node=args.nproc_per_node)


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(extend=_add_flow_commands)


def _add_flow_commands(sub: argparse._SubParsersAction) -> None:
    """demo, study and deploy: the commands that orchestrate (Prefect), beside cloob's own."""
    p = sub.add_parser("demo", help="the whole pipeline on this machine: demo data served on 127.0.0.1 -> "
                                    "img2dataset shards -> CLOOB and CLIP under torchrun -> registry -> "
                                    "zero-shot evaluation -> results table (ephemeral Prefect)")
    p.add_argument("--store", default="./cloob-demo", help="storage root (folder or s3://...; default ./cloob-demo)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per model")
    p.add_argument("--samples", type=int, default=4096, help="captioned images in the demo set")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes per model (torchrun)")
    p.add_argument("--seeds", type=int, default=1, help="train each model with seeds 0..N-1 and print the mean "
                                                        "± std over them (default 1)")
    p.set_defaults(func=_cmd_demo, own_logging=True)
    p = sub.add_parser("study", help="a study (methods x seeds x settings, evaluated over training) as one "
                                     "pipeline run, with means over seeds, significance and diagnostics")
    p.add_argument("study", help="a shipped study (demo, cloob_vs_clip_cc3m, ablation_cc3m) or a study YAML")
    p.add_argument("--store", default="./cloob-study", help="storage root (folder or s3://...; default ./cloob-study)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="replace a study field (e.g. seeds=2)")
    p.add_argument("--train-deployment", metavar="FLOW/NAME",
                   help="train every cell through this deployment (cloob-train/gpu: see cloob deploy); default: here")
    p.add_argument("--eval-deployment", metavar="FLOW/NAME",
                   help="evaluate every checkpoint x set through this deployment (evaluate-checkpoints/gpu); "
                        "default: here")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes (GPUs) per node")
    p.set_defaults(func=_cmd_study, own_logging=True)
    add_deploy_parser(sub)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
