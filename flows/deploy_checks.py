"""What `cloob deploy` checks before it builds a plan or contacts a server (flows/deploy.py): the
option combinations that cannot work, and the names (recipes, data specs, evaluation sets, the
default study) that must exist where the workers run, so that a typo fails at deploy time rather
than in a scheduled run.
"""

from __future__ import annotations

import os

from cloob.errors import CloobError


def check_args(args) -> None:
    """The combinations that cannot work, before anything is imported or contacted."""
    if args.nnodes < 1 or args.gpus_per_node < 1:
        raise CloobError(f"--nnodes {args.nnodes} --gpus-per-node {args.gpus_per_node}", "both must be at least 1")
    if args.train_slots < 1:
        raise CloobError(f"--train-slots {args.train_slots}", "give the number of trainings the GPU pool runs at "
                                                             "once (its machines, or its node groups), at least 1")
    if args.nnodes > 1 and not args.k8s:
        raise CloobError(f"--nnodes {args.nnodes} needs the Kubernetes pool: a process worker runs one machine",
                         "add --k8s --image <GPU image>, or train on one node (--nnodes 1)")
    if args.k8s and not args.image:
        raise CloobError("the Kubernetes pool needs an image to run",
                         "build docker/Dockerfile.gpu, push it, and pass --image REGISTRY/cloob-gpu:TAG")
    if args.image and not args.k8s:
        raise CloobError("--image is used by the Kubernetes pool only: process workers run the code installed "
                         "where they run (docker/Dockerfile.gpu for the GPU worker)", "add --k8s, or drop --image")
    if "://" not in args.store and not os.path.isabs(args.store):
        # A worker runs each flow in a temporary folder of its own: a relative path would land there.
        raise CloobError(f"--store {args.store!r} is a relative path",
                         "pass a bucket (s3://bucket/prefix) or an absolute folder that every worker sees")


def check_names(args) -> None:
    """Recipes, specs and evaluation sets must exist under these names where the workers run (the same
    package), so a typo fails here rather than at 03:00 on Sunday."""
    from cloob.config import load_recipe
    from cloob.evaluate.sets.spec import load_downstream_spec
    from cloob.prepare.distributors import check_flags
    from cloob.prepare.spec import load_spec

    for spec in args.spec:
        loaded = load_spec(spec, list(args.spec_override or []))
        check_flags(loaded.download.distributor, args.cluster, whose=f"the distributor of spec {spec!r}",
                    set_with="--spec-override", flag=args.cluster_flag)
        field = missing_source_file(loaded)
        if field:
            # `cloob prepare` takes it as --input; a scheduled run has only the spec and its overrides.
            raise CloobError(f"data spec {spec!r} has no source.{field}, and a scheduled run has no --input",
                             f"add --spec-override source.{field}=s3://bucket/path/to/file (a file the CPU "
                             "workers can read)")
    from flows.pipeline import check_overrides

    for entry in args.recipe:
        name, *overrides = entry.split()
        check_overrides(entry, list(args.override or []), overrides)  # as the pipeline will refuse it
        load_recipe(name, [*(args.override or []), *overrides])  # in the pipeline's order
    for name in args.downstream:
        load_downstream_spec(name)
    if args.study:
        check_study(args)


def missing_source_file(spec) -> str | None:
    """The source field a deployed run needs and this data spec leaves empty (the file `cloob prepare`
    would take as --input), or None."""
    field = {"cc3m": "path", "table": "path", "yfcc15m": "metadata"}.get(spec.source.kind)
    return field if field and getattr(spec.source, field) is None else None


def check_study(args) -> None:
    """The --study default of cloob-study/cluster: it loads, every cell's recipe loads (check_cells),
    its sets exist, and its data spec, with the overrides a run will add, names its source file."""
    from cloob.evaluate.sets.spec import load_downstream_spec
    from cloob.prepare.spec import load_spec
    from cloob.study.cells import check_cells
    from cloob.study.spec import load_study
    from flows.tasks import spec_name

    study = load_study(args.study)
    check_cells(study)
    for name in study.downstream:
        load_downstream_spec(name)
    extra = study_data_overrides(args).get(spec_name(study.data), [])
    field = missing_source_file(load_spec(study.data, [*study.data_overrides, *extra]))
    if field:
        raise CloobError(f"study {args.study!r} trains on data spec {study.data!r}, which has no source.{field}",
                         f"add --spec {spec_name(study.data)} --spec-override source.{field}=s3://bucket/path/to/file "
                         "(its overrides go to the study's data too)")


def study_data_overrides(args) -> dict[str, list[str]]:
    """What cloob-study/cluster adds to a study's data spec: each --spec's --spec-override."""
    from flows.tasks import spec_name

    return {spec_name(spec): list(args.spec_override or []) for spec in args.spec if args.spec_override}
