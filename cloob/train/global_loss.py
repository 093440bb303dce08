"""The loss of the global batch under DDP (or in one process), as the recipe's loss section asks.

    loss_fn = GlobalLoss(recipe.loss, info, global_batch)
    for_backward, value = loss_fn(image_features, text_features, inv_tau)

Gradient convention (the one place it is written down): after DDP's averaging, every parameter's
gradient, logit_scale included, is the gradient of the loss L of the whole global batch, exactly as
one process computing L on the concatenated batch would have it, whatever the number of ranks and
whichever path (tests/test_distributed.py). DDP averages over W ranks, so each rank back-propagates
W times its part:
- sharded: rank r's part is L_r, the loss rows of its own pairs (sum_r L_r = L; cloob/losses/rows.py);
  the features are gathered with autograd, so each owner receives the sum of every rank's gradient
  on its features, and inv_tau's gradient sum_r dL_r/dtau = dL/dtau;
- replicated: each rank computes all of L on features gathered without autograd (its own block put
  back), so it holds dL/df_r for its own features only, but the whole dL/dtau: inv_tau's gradient is
  scaled by 1/W so that DDP's average leaves dL/dtau.
`value` is L itself (detached, the same on every rank), for logging and the non-finite check.
"""

from __future__ import annotations

import torch

from cloob.config import LossConfig
from cloob.losses import rows_loss
from cloob.losses.plan import LossPlan, free_memory_bytes, loss_on_plan, plan_loss
from cloob.train import distributed
from cloob.train.distributed import DistInfo


class GlobalLoss:
    def __init__(self, cfg: LossConfig, info: DistInfo, global_batch: int, *, free_bytes: int | None = None):
        self.cfg, self.info, self.n = cfg, info, global_batch
        self.plan: LossPlan = plan_loss(global_batch, info.world_size, distributed=cfg.distributed,
                                        blocked=cfg.blocked, block_rows=cfg.block_rows,
                                        free_bytes=free_memory_bytes(info.device) if free_bytes is None else free_bytes,
                                        device_type=info.device.type)

    def _kw(self) -> dict:
        return dict(objective=self.cfg.objective, retrieval=self.cfg.retrieval, beta=self.cfg.beta)

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor,
                 inv_tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        info, plan, w = self.info, self.plan, self.info.world_size
        if plan.sharded:
            part = rows_loss(image_features, text_features, inv_tau, **self._kw(), n_global=self.n,
                             offset=info.rank * image_features.shape[0], gather=distributed.gather_with_grad,
                             block=plan.block)
            value = part.detach().clone()
            torch.distributed.all_reduce(value)
            return part * w, value
        x = distributed.gather_features(image_features, info)
        y = distributed.gather_features(text_features, info)
        t = distributed.scale_grad(inv_tau, 1.0 / w)
        loss = loss_on_plan(plan, x, y, t, **self._kw())  # as cloob.losses.LossSpec runs it
        return (loss * w if w > 1 else loss), loss.detach()
