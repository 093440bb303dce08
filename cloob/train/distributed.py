"""Process-group setup under torchrun (or a single process) and the feature gather for the loss.

Gradient convention: features are gathered WITHOUT autograd and the local block is put back in place,
so every rank computes the loss over the global batch and gets the exact gradient with respect to its
own features. DDP then averages parameter gradients, so each rank's gradient is the full-batch
gradient divided by world_size (tested in tests/test_distributed.py).

inv_tau (logit_scale) is different: it enters only through the loss, which every rank computes in
full, so each rank would hold its FULL gradient and DDP's average would keep it full, W times the
convention above. `scale_grad(inv_tau, 1/W)` puts it on the same footing as every other parameter.
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


def gather_features(local: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's features in rank order; only the local block carries gradient."""
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


def loss_inputs(image_features, text_features, inv_tau, info: DistInfo):
    """Global-batch features and an inv_tau whose gradient follows the 1/world_size convention."""
    return (gather_features(image_features, info), gather_features(text_features, info),
            scale_grad(inv_tau, 1.0 / info.world_size))


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
