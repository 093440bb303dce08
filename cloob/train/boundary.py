"""What the ranks decide together at the end of every step, in one tiny all_reduce(MAX):

- stop: did any rank get SIGTERM (cloob.train.preemption)? Then all stop after this same step.
- skip: is this step non-finite on any rank (cloob.train.nonfinite)? Then none takes it.

Without agreement a rank could stop or skip alone and leave the others waiting in their next
collective. Reading the result waits for the device once per step (the GradScaler of fp16 does the
same in its step); the all_reduce itself is two numbers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cloob.train.distributed import DistInfo


def agree(info: DistInfo, stop_signal: int, nonfinite: torch.Tensor) -> tuple[int, bool]:
    """(the stop signal, 0 for none; whether to skip this step), the same on every rank."""
    flags = torch.stack([torch.tensor(float(stop_signal), device=nonfinite.device), nonfinite.float()])
    if info.distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop, skip = flags.tolist()
    return int(stop), skip > 0
