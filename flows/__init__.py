"""The Prefect 3 flows over cloob (cloob/ never imports Prefect); flows/README.md has the detail.

    pipeline.py       the flows cloob-pipeline (specs -> shards -> training -> registry -> evaluation ->
                      results), cloob-train (one training run, for a GPU work pool) and
                      evaluate-checkpoints
    tasks.py          their tasks, each calling one cloob function, Skipped when its output exists
    names.py          the task runs' names (train-<run>, evaluate-<run>-step<N>-on-<set>, ...)
    remote.py         waiting for a deployment run: no worker, heartbeats lost, a Crashed run started again
    outage.py         riding out a Prefect server that is away (CLOOB_API_OUTAGE_S)
    promote.py        the pipeline's promotion decisions, with a reviewer's approval
    summary.py        the run's summary artifact (cloob-pipeline-summary)
    study.py          the cloob-study flow: a study spec's cells trained, evaluated and reported
    signals.py        SIGTERM and SIGINT end a flow process and every process tree it started
    cli.py            the installed `cloob` command: cloob.cli plus demo, study and deploy
    demo.py           `cloob demo`: the pipeline under an ephemeral Prefect, on generated data
    deploy.py         `cloob deploy`: work pools and deployments on a Prefect server
    deploy_checks.py  deploy's checks before any plan: option combinations that cannot work, names
                      (recipes, specs, sets, the study) that must exist where the workers run
    k8s_node.py       the entrypoint of each pod of a Kubernetes training Job: pod 0 runs the flow,
                      the others join as torchrun nodes
"""
