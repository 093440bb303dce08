"""Running the pipeline's steps, apart from what they compute.

    launch.py     a training run under torchrun as a supervised process tree (log, progress, deadline,
                  cancel, step watchdog, one error message, nothing left behind)
    console.py    `cloob train` in a terminal: launch with live output, SIGTERM/SIGINT passed on
    reports.py    what ranks and torchrun tell the launcher as files: heartbeats, error records
    watchdog.py   the step watchdog: a run whose ranks stop making progress, and the rank at fault
    torchrun.py   `python -m cloob.run.torchrun`: torchrun that stops when its launcher dies
    lifeline.py   the kernel's parent-death signal, so no rank outlives its supervisor
    state.py      content keys that say a step (prepare, train, evaluate) is already done
"""
