"""Training: the loop and the parts it is made of.

    loop.py         the training loop (single process, or one rank under torchrun): `train`, `plan_run`
    checkpoint.py   atomic step checkpoints on any fsspec URL (no torch needed to list or read meta)
    optim.py        AdamW parameter groups and the learning-rate schedules
    distributed.py  process groups, the feature gather and its gradient convention
    metrics.py      metrics.jsonl and TensorBoard

`python -m cloob.train <recipe> [overrides]` (also under torchrun) runs the loop. Importing this
package imports nothing heavy: `train`, `plan_run` and `main` load the loop (torch, open_clip) on
first use, so `cloob.train.checkpoint` stays light for the registry and the evaluation.
"""

from __future__ import annotations

_LOOP = ("train", "plan_run", "main", "Plan")


def __getattr__(name: str):
    if name in _LOOP:
        from cloob.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'cloob.train' has no attribute {name!r}")
