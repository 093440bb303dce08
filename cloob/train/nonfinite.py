"""Non-finite steps: a step whose loss or gradient is NaN or infinite is skipped and counted, up to
train.max_nonfinite_steps; past that the run stops with one message.

Skipped means what fp16's GradScaler does when it skips: no optimizer step (weights, Adam moments
and the optimizer's own step count stay as they were, and so does the grad scaler), while the step
counter, the learning-rate schedule and the data stream go on. The count is logged in
metrics.jsonl (`nonfinite_skipped`) and kept in the checkpoint's train state, so a resumed run goes
on counting. It is a count over the whole run, not of consecutive steps: skipped steps are lost
training whether they come together or not.

Every rank makes the same decision: the flag is computed from the global batch's loss value (the
same on every rank, cloob/train/global_loss.py) and the gradients, which DDP has made equal on all
ranks; and it goes into the all_reduce(MAX) that ends every step (cloob.train.boundary), so even a
rank that saw something the others did not makes every rank skip.

fp16: the scaled gradients overflowing is the GradScaler's normal operation: it skips that step
itself and halves its scale (from 65536), and that is not counted. A step counts only when the loss
itself is not finite (no scale makes a NaN loss finite), or when the gradients are still not finite
at a scale of 1 or less, where scaling cannot be the cause. So an fp16 run whose gradients really
explode is stopped after about 16 uncounted halvings plus the limit.
"""

from __future__ import annotations

import posixpath

import torch

from cloob.errors import CloobError


def flag(loss: torch.Tensor, parameters, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """1.0 when this step must be skipped as non-finite on this rank, else 0.0; computed on the
    device, without waiting for it (the decision is read after the all_reduce). Call it after
    backward, unscale_ and clipping: on the gradients the optimizer would apply."""
    bad_loss = ~torch.isfinite(loss.detach()).all()
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return bad_loss.float()
    # amax, not a norm: a norm of huge but finite values overflows; amax propagates NaN and inf.
    bad_grads = ~torch.isfinite(torch.stack([g.abs().amax().float() for g in grads]).amax())
    if scaler.is_enabled() and scaler.get_scale() > 1.0:
        bad_grads = torch.zeros_like(bad_grads)  # an overflow of the scaled gradients: the scaler's job
    return (bad_loss | bad_grads).float()


class NonfiniteSteps:
    """Counts the skipped steps of a run and stops it past the limit."""

    def __init__(self, limit: int, skipped: int = 0):
        self.limit, self.skipped = limit, skipped

    def skip(self, step: int, scaler: torch.amp.GradScaler, last_checkpoint: str | None) -> None:
        """Step `step` (1-based) is skipped: no optimizer step; the scaler is left as it was. Raises
        CloobError when this is one more than the limit allows."""
        self.skipped += 1
        # The scaler may have unscaled this step's gradients (unscale_): update() with its own scale
        # forgets that without changing the scale, so the next step can unscale again.
        if scaler.is_enabled():
            scaler.update(new_scale=scaler.get_scale())
        if self.skipped > self.limit:
            good = posixpath.basename(last_checkpoint.rstrip("/")) if last_checkpoint else None
            where = f"the last good checkpoint is {last_checkpoint}" if good else "no checkpoint was written yet"
            raise CloobError(
                f"the loss or its gradient was not finite at step {step}: {self.skipped} such steps skipped, more "
                f"than train.max_nonfinite_steps={self.limit}; {where}",
                "lower optim.lr, set optim.grad_clip (e.g. 1.0), or use train.precision=bf16 or fp32 instead of "
                "fp16 (another recipe: it trains in a new run folder)")
