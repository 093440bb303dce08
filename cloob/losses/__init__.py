"""Contrastive losses for image-text pretraining: CLOOB, CLIP and the two ablation corners.

- cloob.losses.full: the loss of a whole batch in one process, the fastest exact path while its
  N x N buffers fit (shared Gram matrices, hand-written backward); its docstring has the notation.
- cloob.losses.rows: the same loss as a sum over rows, for a part of the rows against the whole
  batch: the per-rank share of the sharded DDP loss, and the blocked path whose memory is O(N d).
- cloob.losses.plan: which of them to use for a given batch, memory and recipe, for the trainer and
  for LossSpec alike: `LossSpec.from_method("cloob")(x, y, inv_tau)` takes the blocked path where
  the full path's N x N buffers would not fit in the memory free now, as training does.
"""

from cloob.losses.full import (  # noqa: F401 (the public API)
    METHODS,
    LossSpec,
    Objective,
    Retrieval,
    contrastive_loss,
    hopfield_retrieval,
    hopfield_retrieve_all,
    info_loob,
    info_nce,
)
from cloob.losses.rows import retrieve_rows, rows_loss  # noqa: F401
