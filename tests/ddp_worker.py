"""Run under `torchrun --nproc_per_node N`: one DDP step of the tiny model on this rank's slice of a
fixed global batch; saves the loss and the (DDP-averaged) parameter gradients for the test to compare.
"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from cloob.losses import LossSpec
from cloob.model import create_model
from cloob.train import distributed

GLOBAL_BATCH = 8


def global_batch(tokenizer):
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    words = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    texts = tokenizer([f"a {w} circle and a {words[-i - 1]} square" for i, w in enumerate(words)])
    return images, texts


def build(method_inv_tau=30.0):
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model("cloob-tiny-vit", inv_tau=method_inv_tau, learn_inv_tau=True)
    return model.double(), tokenizer


def main(out_dir: str, methods: list[str]) -> None:
    info = distributed.init("cpu")
    for method in methods:
        model, tokenizer = build()
        images, texts = global_batch(tokenizer)
        per = GLOBAL_BATCH // info.world_size
        part = slice(info.rank * per, (info.rank + 1) * per)
        ddp = DistributedDataParallel(model)
        image_features, text_features, inv_tau = ddp(images[part], texts[part])
        loss = LossSpec.from_method(method)(*distributed.loss_inputs(image_features, text_features, inv_tau, info))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/{method}-rank{info.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
