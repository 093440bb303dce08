"""The model of ml-jku/cloob, the paper's code, for the import test: its CLIPGeneral (src/clip/model.py)
with a ModifiedResNet image tower and a TextTransformer text tower, written here from reading that
file (not copied), and nothing of open_clip: the converted open_clip model is compared against it.

The module tree is the reference's, so the state dict has its key names and shapes: visual.*,
transformer.transformer.resblocks.*, transformer.token_embedding.weight, transformer.positional_embedding,
transformer.ln_final.*, transformer.text_projection, logit_inv_tau (and logit_scale_hopfield in the
first commit's model). The computation is the reference's, written out: attention by hand (the
reference calls torch's multi-head attention), QuickGELU in the text transformer, ReLU in the ResNet,
the text feature at the end-of-text token (the largest token id), the image feature at the attention
pool's mean token.

`save_reference_checkpoint` writes a file as the reference's training script does: {epoch, name,
state_dict (with DistributedDataParallel's "module." prefix), optimizer, scheduler} plus the
model_config_file the notebook reads (and `method` of the first commit), optionally with its tensors
tagged as saved from a GPU.
"""

from __future__ import annotations

import math
import pathlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# src/training/model_configs/RN50.json and RN50x4.json of ml-jku/cloob.
RN50 = {"embed_dim": 1024, "image_resolution": 224, "vision_layers": (3, 4, 6, 3), "vision_width": 64,
        "context_length": 77, "vocab_size": 49408, "transformer_width": 512, "transformer_heads": 8,
        "transformer_layers": 12}
RN50x4 = {"embed_dim": 640, "image_resolution": 288, "vision_layers": (4, 6, 10, 6), "vision_width": 80,
          "context_length": 77, "vocab_size": 49408, "transformer_width": 640, "transformer_heads": 10,
          "transformer_layers": 12}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):  # computed in float32 whatever the input, as the reference does
        return super().forward(x.float()).to(x.dtype)


def _attention(q, k, v, heads: int, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v per head; q: [n, lq, c], k and v: [n, lk, c]."""
    n, lq, c = q.shape
    d = c // heads

    def split(t):
        return t.reshape(n, t.shape[1], heads, d).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(dim=-1) @ split(v)).transpose(1, 2).reshape(n, lq, c)


class Bottleneck(nn.Module):
    """1x1, 3x3, (avgpool when strided), 1x1 convolutions; the shortcut avgpools before its 1x1."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride > 1 or cin != cout:
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)),
                                                         ("0", nn.Conv2d(cin, cout, 1, bias=False)),
                                                         ("1", nn.BatchNorm2d(cout))]))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.avgpool(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class AttentionPool(nn.Module):
    """Attention over the feature map's positions plus their mean; the mean's output is the feature."""

    def __init__(self, grid: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads = heads

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # [n, hw, c]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding
        out = _attention(self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x), self.heads)
        return self.c_proj(out[:, 0])


class ModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim: int, heads: int, input_resolution: int, width: int):
        super().__init__()
        self.input_resolution = input_resolution
        half = width // 2
        self.conv1, self.bn1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half)
        self.conv2, self.bn2 = nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half)
        self.conv3, self.bn3 = nn.Conv2d(half, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        cin = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            stage = [Bottleneck(cin, planes, stride)] + [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = planes * 4
        self.attnpool = AttentionPool(input_resolution // 32, width * 32, heads, output_dim)

    def forward(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class SelfAttention(nn.Module):
    """The parameters of torch's nn.MultiheadAttention (in_proj_weight/bias: q, k, v stacked; out_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x, mask):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_attention(q, k, v, self.heads, mask))


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn, self.ln_1 = SelfAttention(dim, heads), LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(dim, dim * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(dim * 4, dim))]))
        self.ln_2 = LayerNorm(dim)

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualBlock(width, heads) for _ in range(layers)])

    def forward(self, x, mask):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class TextTransformer(nn.Module):
    def __init__(self, embed_dim, context_length, vocab_size, transformer_width, transformer_heads,
                 transformer_layers):
        super().__init__()
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        n = x.shape[1]  # causal: position i sees positions <= i (the reference's mask is not in its state dict)
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        x = self.ln_final(self.transformer(x, mask))
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


class ReferenceCLIP(nn.Module):
    """CLIPGeneral(ModifiedResNet, TextTransformer); with hopfield=True the first commit's model, which
    also holds logit_scale_hopfield."""

    def __init__(self, *, embed_dim, image_resolution, vision_layers, vision_width, context_length, vocab_size,
                 transformer_width, transformer_heads, transformer_layers, init_inv_tau=30.0,
                 hopfield: bool = False, init_scale_hopfield: float = 8.0):
        super().__init__()
        self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_resolution, vision_width)
        self.transformer = TextTransformer(embed_dim, context_length, vocab_size, transformer_width,
                                           transformer_heads, transformer_layers)
        self.logit_inv_tau = nn.Parameter(torch.tensor(math.log(init_inv_tau)))
        if hopfield:
            self.logit_scale_hopfield = nn.Parameter(torch.tensor(math.log(init_scale_hopfield)))

    def encode_image(self, images):
        return self.visual(images)

    def encode_text(self, tokens):
        return self.transformer(tokens)


def build(config: dict, seed: int, *, hopfield: bool = False, inv_tau: float = 30.0, device="cpu") -> ReferenceCLIP:
    """A ReferenceCLIP of `config` (RN50, RN50x4, ...) with random weights (seeded), in eval mode; on the
    meta device only its keys and shapes (no memory, no time)."""
    with torch.device("meta"):
        model = ReferenceCLIP(**config, hopfield=hopfield, init_inv_tau=inv_tau)
    if str(device) == "meta":
        return model.eval()
    model.to_empty(device=device)
    randomize(model, seed)
    calibrate_batchnorm(model, seed)
    with torch.no_grad():
        model.logit_inv_tau.fill_(math.log(inv_tau))
        if hopfield:
            model.logit_scale_hopfield.fill_(math.log(8.0))
    return model.eval()


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and buffer random (seeded), at scales that keep the activations moderate. (The
    reference's own initialisation zeroes every block's bn3, which would leave most weights untested.)"""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            # a residual branch's last gain small, so that 16 blocks do not multiply the activations
            uniform(m.weight, 0.1, 0.3) if name.endswith("bn3") else uniform(m.weight, 0.5, 1.5)
            normal(m.bias, 0.1)
            normal(m.running_mean, 0.1)
            uniform(m.running_var, 0.5, 1.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=g)))
        elif isinstance(m, nn.LayerNorm):
            uniform(m.weight, 0.5, 1.5)
            normal(m.bias, 0.1)
        elif isinstance(m, nn.Conv2d | nn.Linear):
            normal(m.weight, m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                normal(m.bias, 0.02)
        elif isinstance(m, nn.Embedding):
            normal(m.weight, 0.5)
        elif isinstance(m, SelfAttention):
            normal(m.in_proj_weight, m.in_proj_weight.shape[1] ** -0.5)
            normal(m.in_proj_bias, 0.02)
        elif isinstance(m, AttentionPool):
            normal(m.positional_embedding, 0.1)
        elif isinstance(m, TextTransformer):
            normal(m.positional_embedding, 0.1)
            normal(m.text_projection, m.text_projection.shape[0] ** -0.5)
    # The last projections small: embeddings with norms of a few units, as a trained model's.
    model.visual.attnpool.c_proj.weight.mul_(0.05)
    model.transformer.text_projection.mul_(0.1)
    return model


@torch.no_grad()
def calibrate_batchnorm(model: ReferenceCLIP, seed: int, size: int = 96) -> None:
    """BatchNorm's running statistics measured on smooth random pictures, as training leaves them:
    with random statistics the picture's signal fades through the blocks, and every image gets nearly
    the same embedding. (The ResNet alone, at a small size: the statistics are per channel.)"""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, size, size, generator=g).cumsum(-1).cumsum(-2)
    images = (images - images.mean()) / images.std()  # about the spread of normalised pictures
    norms = [m for m in model.visual.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the plain average over the batches seen: here, one
        m.train()
    v = model.visual
    x = images
    for conv, bn in ((v.conv1, v.bn1), (v.conv2, v.bn2), (v.conv3, v.bn3)):
        x = F.relu(bn(conv(x)))
    v.layer4(v.layer3(v.layer2(v.layer1(v.avgpool(x)))))
    for m in norms:
        m.momentum = 0.1
        m.eval()
        m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (), generator=g)))


def reference_classifier(model: ReferenceCLIP, tokenize, classnames, templates) -> torch.Tensor:
    """The zero-shot classifier as the reference's notebook computes it: per class, every template's
    text embedding normalised, their mean normalised again; [dim, classes]."""
    with torch.no_grad():
        columns = []
        for name in classnames:
            emb = model.encode_text(tokenize([t.format(name) for t in templates]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            columns.append(mean / mean.norm())
        return torch.stack(columns, dim=1)


def save_reference_checkpoint(model: ReferenceCLIP, path, *, epoch: int = 28, name: str = "cloob-yfcc",
                              model_config_file="RN50.json", method: str | None = None,
                              saved_on_gpu: bool = True) -> None:
    """The file as ml-jku/cloob's training writes it (see the module's docstring)."""
    import torch.serialization as ser

    ddp = nn.Module()
    ddp.module = model  # DistributedDataParallel's wrapping: every key gets "module."
    state_dict = ddp.state_dict()
    # A real AdamW and LambdaLR state, of two small parameters (the real one covers the whole model).
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))]
    opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.0}, {"params": params[1:], "weight_decay": 0.1}],
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    sum((p ** 2).sum() for p in params).backward()
    opt.step()
    sched.step()
    ckpt = {"epoch": epoch, "name": name, "state_dict": state_dict, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict()}
    if model_config_file is not None:
        ckpt["model_config_file"] = (pathlib.PosixPath(model_config_file) if isinstance(model_config_file, str)
                                     else model_config_file)
    if method is not None:
        ckpt["method"] = method
    if not saved_on_gpu:
        torch.save(ckpt, path)
        return

    # Tag every storage "cuda:0", as a file saved from a GPU is: it loads on a CPU-only machine only
    # with map_location.
    def tag(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    ser.register_package(-1000, tag, lambda storage, location: None)
    try:
        torch.save(ckpt, path)
    finally:
        ser._package_registry[:] = [e for e in ser._package_registry if e[1] is not tag]
