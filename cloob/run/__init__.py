"""Running the pipeline's steps, apart from what they compute.

    launch.py     a training run under torchrun as a supervised process tree (log, progress, deadline,
                  cancel, step watchdog, one error message, nothing left behind)
    console.py    `cloob train` in a terminal: launch with live output, SIGTERM/SIGINT passed on
    reports.py    what ranks and torchrun tell the launcher as files: heartbeats, error records
    watchdog.py   the step watchdog: a run whose ranks stop making progress, and the rank at fault
    torchrun.py   `python -m cloob.run.torchrun`: torchrun that stops when its launcher dies
    rank_fork.py  its ranks forked from the agent with the trainer imported, not new interpreters
    proctree.py   torchrun's process tree as the launcher sees it: remembered as it appears, stopped by pid
    lifeline.py   the kernel's parent-death signal, so no rank outlives its supervisor
    state.py      content keys that say a step (prepare, train, evaluate) is already done

The path from `cloob train` to the training loop, through 7 files and 3 levels of processes:

    pyproject.toml           [project.scripts] cloob = "flows.cli:main"
    flows/cli.py             main -> cloob.cli.main (flows/ only adds the Prefect commands)
    cloob/cli.py             _cmd_train -> cloob.run.console.train_command
    cloob/run/console.py     train_command: the recipe checked, signals passed on, live output -> launch
    cloob/run/launch.py      launch: the run resolved, build_command -> _supervise: Popen(python -m
                             cloob.run.torchrun ... -m cloob.train <recipe> <overrides>), watched
      -- process 2: torchrun --
    cloob/run/torchrun.py    main: dies with its parent (lifeline.py), imports the trainer once
                             (rank_fork.py) -> torch.distributed.run
      -- processes 3..N: one per rank, each a fork of torchrun's agent (CLOOB_RANK_START=exec: a
         new interpreter each) --
    cloob/run/rank_fork.py   start: the rank's session, environment and stdio as Popen gave them ->
    cloob/train/__main__.py  timm left out when the model does not need it -> cloob.train.loop.main
    cloob/train/loop.py      main -> train (process group, cleanup) -> _train (the loop)

Each hop has one job: a terminal and its signals (console), a supervisor that flows/tasks.py uses too
(launch), a torchrun that cannot outlive its launcher (torchrun), a faster start of every rank
(rank_fork, __main__). docs/training.md and docs/operations.md say what a run does and how it fails.
"""
