"""Which exact loss path a run takes: sharded over the ranks or replicated on each, blocked or not.

All paths compute the same loss and gradients (to float32 rounding); they differ in work and memory
per rank. For a global batch of N pairs on W ranks (B = N / W rows each), float32:

    path                      work per rank   loss buffers per rank (kept for backward + temporaries)
    replicated, full          25 N^2 d        ~7 N x N
    sharded                   30 N^2 d / W    ~8 B x N
    ... blocked (b rows)      36 N^2 d / W    ~3 b x N + O(N d)

`loss.blocked: auto` blocks when the unblocked buffers would take more than a quarter of the memory
free at the start (the model's activations, the optimizer and the allocator need the rest).

The trainer (cloob.train.global_loss) and the library's entry point (cloob.losses.LossSpec, through
planned_loss below) take their path from the same plan_loss and run it with the same loss_on_plan: at
N = 32768 a LossSpec call no longer asks for the N x N buffers that training would not either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

from cloob.losses.full import contrastive_loss
from cloob.losses.rows import rows_loss

FLOAT32 = 4
AUTO_MEMORY_FRACTION = 0.25  # of the free memory at the start, for the loss's N x N buffers
# One block's scores (b x N float32). On CPU a block that stays in the last-level cache through its
# elementwise passes is faster than a big one (N = 16384, d = 256, this 2-core machine: 128 rows
# 1.07x the unblocked time, 256 rows 1.16x, 1024 rows 1.40x); a GPU wants big products instead.
BLOCK_BYTES = {"cpu": 8 * 2**20, "cuda": 256 * 2**20}
MIN_BLOCK_ROWS = 64


@dataclass(frozen=True)
class LossPlan:
    sharded: bool  # each rank computes the rows of its own pairs (with W > 1)
    rows: int  # query/anchor rows this rank computes: B when sharded, N otherwise
    block: int | None  # rows per block of the blocked path; None: one pass, the softmax kept
    buffer_bytes: int  # the estimate the choice was made on

    def describe(self, world_size: int) -> str:
        how = f"sharded over {world_size} ranks" if self.sharded else \
            ("replicated on each rank" if world_size > 1 else "one process")
        mem = f", blocked ({self.block} rows at a time)" if self.block else ""
        size = f"{self.buffer_bytes / 2**30:.1f} GiB" if self.buffer_bytes >= 2**30 else f"{self.buffer_bytes / 2**20:.0f} MiB"
        return f"{how}{mem}; about {size} of loss buffers per rank"


def buffer_bytes(n: int, rows: int, sharded: bool, block: int | None) -> int:
    if block:
        return 3 * block * n * FLOAT32
    if sharded:
        return 8 * rows * n * FLOAT32
    return 7 * n * n * FLOAT32


def auto_block_rows(n: int, rows: int, device_type: str = "cpu") -> int:
    b = max(MIN_BLOCK_ROWS, BLOCK_BYTES.get(device_type, BLOCK_BYTES["cuda"]) // (FLOAT32 * n))
    return min(rows, 1 << (b.bit_length() - 1))  # a power of two: the products' favourite shapes


def plan_loss(n_global: int, world_size: int, *, distributed: str = "sharded", blocked: bool | str = "auto",
              block_rows: int | None = None, free_bytes: int | None = None, device_type: str = "cpu") -> LossPlan:
    """The path for a global batch of n_global pairs on world_size ranks; free_bytes: the memory
    this rank may use (needed for blocked='auto')."""
    sharded = world_size > 1 and distributed == "sharded"
    rows = n_global // world_size if sharded else n_global
    unblocked = buffer_bytes(n_global, rows, sharded, None)
    if blocked == "auto":
        blocked = free_bytes is not None and unblocked > AUTO_MEMORY_FRACTION * free_bytes
    if not blocked:
        return LossPlan(sharded, rows, None, unblocked)
    block = min(rows, block_rows) if block_rows else auto_block_rows(n_global, rows, device_type)
    return LossPlan(sharded, rows, block, buffer_bytes(n_global, rows, sharded, block))


def free_memory_bytes(device: torch.device) -> int:
    """What this process may use: the GPU's free memory, or the host's available memory shared by the
    ranks on this host (LOCAL_WORLD_SIZE under torchrun)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return psutil.virtual_memory().available // max(1, local_ranks)


def loss_on_plan(plan: LossPlan, image_features: torch.Tensor, text_features: torch.Tensor,
                 inv_tau: torch.Tensor | float, *, objective: str, retrieval: str, beta: float) -> torch.Tensor:
    """The loss of a whole batch in one process on the plan's path: the blocked rows path (memory
    O(N d + block N)) or the full path (N x N buffers); the same value and gradients to float rounding."""
    if plan.block:
        return rows_loss(image_features, text_features, inv_tau, objective=objective, retrieval=retrieval,
                         beta=beta, block=plan.block)
    return contrastive_loss(image_features, text_features, inv_tau, objective=objective, retrieval=retrieval,
                            beta=beta)


def planned_loss(image_features: torch.Tensor, text_features: torch.Tensor, inv_tau: torch.Tensor | float, *,
                 objective: str, retrieval: str, beta: float, blocked: bool | str = "auto",
                 block_rows: int | None = None, free_bytes: int | None = None) -> torch.Tensor:
    """The loss of one process's batch on the path training would take for it (cloob.losses.LossSpec):
    blocked when the full path's buffers would take more than AUTO_MEMORY_FRACTION of the memory free
    now on the features' device (or of free_bytes)."""
    x = image_features
    if x.ndim != 2 or x.shape != text_features.shape:
        blocked = False  # the full path names what is wrong with the features
    elif blocked == "auto" and free_bytes is None:
        free_bytes = free_memory_bytes(x.device)
    plan = plan_loss(x.shape[0] if x.ndim else 0, 1, blocked=blocked, block_rows=block_rows, free_bytes=free_bytes,
                     device_type=x.device.type)
    return loss_on_plan(plan, image_features, text_features, inv_tau, objective=objective, retrieval=retrieval,
                        beta=beta)
