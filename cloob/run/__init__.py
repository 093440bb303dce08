"""Running the pipeline's steps, apart from what they compute.

    launch.py     a training run under torchrun as a supervised process tree (log, progress, deadline,
                  cancel, nothing left behind)
    torchrun.py   `python -m cloob.run.torchrun`: torchrun that stops when its launcher dies
    lifeline.py   the kernel's parent-death signal, so no rank outlives its supervisor
    state.py      content keys that say a step (prepare, train, evaluate) is already done
"""
