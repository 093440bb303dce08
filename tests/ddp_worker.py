"""One rank of a gloo process group (started by tests/test_distributed.py), or the one process it is
compared with: DDP steps on this rank's slice of fixed global batches through cloob.train.global_loss
in each of its paths, and 20 AdamW steps (of two linear towers, and of the tiny ViT).

Also runnable under torchrun: `torchrun --nproc_per_node N tests/ddp_worker.py OUT_DIR`.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cloob.config import LossConfig
from cloob.losses import METHODS
from cloob.model import create_model
from cloob.train.distributed import DistInfo
from cloob.train.global_loss import GlobalLoss

GLOBAL_BATCH = 12  # 6 / 3 rows per rank on 2 / 4 ranks; blocks of 2 and 5 rows do and do not divide them
# (distributed, blocked, block_rows): the default, the 2022 scheme, and both blocked
PATHS = [("sharded", False, None), ("replicated", False, None), ("sharded", True, 2), ("replicated", True, 5)]
DTYPES = [torch.float64, torch.float32]
TRAIN_STEPS = 20
ROOM = 1 << 40  # free memory told to the loss planner: only the paths above are chosen


class Towers(torch.nn.Module):
    """Two linear towers and a learned logit_scale: what the loss paths need of a model (parameters whose
    gradients are sums over the rows of every rank), at a thousandth of the tiny ViT's cost."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Linear(48, 16)
        self.text = torch.nn.Linear(32, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(30.0).log())

    def forward(self, images, texts):
        f = torch.nn.functional.normalize
        return f(self.visual(images), dim=-1), f(self.text(texts), dim=-1), self.logit_scale.exp()


def build(dtype=torch.float64, arch: str | None = None):
    """Towers, or the open_clip architecture `arch` (with its tokenizer), seeded the same on every rank."""
    torch.manual_seed(0)
    if arch is None:
        return Towers().to(dtype), None
    model, _, _, tokenizer = create_model(arch, inv_tau=30.0, learn_inv_tau=True)
    return model.to(dtype), tokenizer


def batch(tokenizer, step: int, dtype):
    """The global batch of a step: random inputs for the towers, images and captions for a real model."""
    g = torch.Generator().manual_seed(1234 + step)
    if tokenizer is None:
        return (torch.randn(GLOBAL_BATCH, 48, generator=g, dtype=dtype),
                torch.randn(GLOBAL_BATCH, 32, generator=g, dtype=dtype))
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=dtype)
    words = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown", "cyan"]
    order = torch.randperm(len(words), generator=g).tolist()
    texts = tokenizer([f"a {words[i]} circle and a {words[order[i]]} square" for i in range(GLOBAL_BATCH)])
    return images, texts


def _cfg(method, path) -> LossConfig:
    distributed, blocked, block_rows = path
    return LossConfig(method=method, beta=8.0, distributed=distributed, blocked=blocked, block_rows=block_rows)


def run(info: DistInfo) -> dict:
    """Every (dtype, method, path): the global loss and the parameter gradients after one DDP step;
    every method on the default path: the weights after TRAIN_STEPS AdamW steps, in both dtypes."""
    per = GLOBAL_BATCH // info.world_size
    part = slice(info.rank * per, (info.rank + 1) * per)
    wrap = (lambda m: DistributedDataParallel(m)) if info.distributed else (lambda m: m)
    out: dict = {"grads": {}, "weights": {}}
    for dtype in DTYPES:
        for method in sorted(METHODS):
            for path in PATHS:
                model, tokenizer = build(dtype)
                ddp = wrap(model)  # kept until after backward: its hooks average the gradients
                images, texts = batch(tokenizer, 0, dtype)
                loss, value = GlobalLoss(_cfg(method, path), info, GLOBAL_BATCH, free_bytes=ROOM)(
                    *ddp(images[part], texts[part]))
                loss.backward()
                out["grads"][(str(dtype), method, path)] = {
                    "loss": value, **{n: p.grad.detach().clone() for n, p in model.named_parameters()
                                      if p.grad is not None}}
    # Training: every method on the towers in both dtypes, CLOOB also on the real tiny ViT (its buffers
    # and layers).
    runs = [*((m, None, dt) for dt in DTYPES for m in sorted(METHODS)), ("cloob", "cloob-tiny-vit", torch.float64)]
    for method, arch, dtype in runs:
        model, tokenizer = build(dtype, arch)
        ddp = wrap(model)
        loss_fn = GlobalLoss(_cfg(method, PATHS[0]), info, GLOBAL_BATCH, free_bytes=ROOM)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        for step in range(TRAIN_STEPS):
            images, texts = batch(tokenizer, step, dtype)
            loss, _ = loss_fn(*ddp(images[part], texts[part]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out["weights"][(method, arch, str(dtype))] = {n: p.detach().clone() for n, p in model.state_dict().items()}
    return out


def rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """A process of a group of `world` (multiprocessing target): joins by a file store, runs, saves."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(run(DistInfo(rank, rank, world)), os.path.join(out_dir, f"w{world}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # under torchrun
    from cloob.train import distributed

    info = distributed.init("cpu")
    torch.save(run(info), os.path.join(sys.argv[1], f"w{info.world_size}-rank{info.rank}.pt"))
    distributed.shutdown()
