"""Process-group setup under torchrun (or a single process) and the collectives the loss needs.

The gradient convention under DDP is written down once, in cloob/train/global_loss.py.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes in the environment; NCCL on GPU, gloo on CPU.

    timeout_s (train.process_group_timeout_s): how long a collective waits for a rank before the run
    fails. The launcher's step watchdog (cloob.run.watchdog) usually notices a frozen rank first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        from cloob.errors import CloobError
        raise CloobError("train.device=cuda but no CUDA GPU is visible", "use train.device=auto or cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, local_rank, world, dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient on a block back to the block's owner."""

    @staticmethod
    def forward(ctx, local: torch.Tensor):
        world = dist.get_world_size()
        out = local.new_empty((world * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(out, local.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world, rank = dist.get_world_size(), dist.get_rank()
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            mine = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        # gloo has no reduce-scatter: an all-reduce (twice the traffic; CPU runs are small) and our rows.
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad.chunk(world)[rank].clone()


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows in rank order, with autograd: the backward pass sums each rank's gradient on
    a block back to the block's owner (a reduce-scatter), as the sharded loss needs."""
    return _GatherWithGrad.apply(local)


def gather_features(local: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's features in rank order without autograd; only the local block, put
    back in place, carries gradient (the replicated loss, where every rank computes every row)."""
    if not info.distributed:
        return local
    blocks = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(blocks, local.detach().contiguous())
    blocks[info.rank] = local
    return torch.cat(blocks)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, factor: float):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass (bit-exact); multiplies the gradient by factor."""
    return _ScaleGrad.apply(t, factor) if factor != 1.0 else t


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
