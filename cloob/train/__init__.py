"""Training: the loop and the parts it is made of.

    loop.py         the training loop (single process, or one rank under torchrun): `train`
    run_state.py    what a run holds (Run, Progress) and the one place each that saves and resumes it
    plan.py         the run's plan (data, batch, steps), checked before anything starts: `plan_run`
    checkpoint.py   atomic step checkpoints on any fsspec URL (no torch needed to list or read meta)
    optim.py        AdamW parameter groups and the learning-rate schedules
    distributed.py  process groups, the feature gather and its gradient convention
    metrics.py      metrics.jsonl (always) and the tracking backends the run asked for
    tracking.py     the tracking backends (train.report_to: tensorboard, wandb), one list; evaluations to them
    global_loss.py  the global batch's loss under DDP, and its gradient convention (written down here)
    boundary.py     what the ranks decide together at the end of every step (stop, skip), one all_reduce
    preemption.py   SIGTERM: the run ends at the next step boundary, with a checkpoint of that step
    nonfinite.py    a NaN or inf step skipped and counted, up to train.max_nonfinite_steps
    failures.py     the environment's errors (full disk, lost store) as one message, out of DataLoader
                    workers too; a checkpoint that cannot be written
    __main__.py     `python -m cloob.train` (also torchrun's `-m cloob.train`): timm left out when unused

`python -m cloob.train <recipe> [overrides]` (also under torchrun) runs the loop. Importing this
package imports nothing heavy: `train` and `main` load the loop (torch, open_clip) on first use, so
`cloob.train.checkpoint` and `cloob.train.plan` stay light for the launcher, the registry and the
evaluation.
"""

from __future__ import annotations

_LOOP = ("train", "main")
_PLAN = ("plan_run", "Plan")


def __getattr__(name: str):
    if name in _LOOP:
        from cloob.train import loop

        return getattr(loop, name)
    if name in _PLAN:
        from cloob.train import plan

        return getattr(plan, name)
    raise AttributeError(f"module 'cloob.train' has no attribute {name!r}")
