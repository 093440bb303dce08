"""`cloob demo`: the embedded default. Generates a captioned shapes set, trains a tiny CLOOB model on
CPU, and reports image-to-text retrieval on held-out pairs before and after training.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from cloob.config import load_recipe
from cloob.data import synthetic


def run_demo(out: Path, steps: int = 300, samples: int = 4096, workers: int = 2) -> dict:
    t0 = time.time()
    shards = out / "data" / "shapes"
    print(f"[1/3] generating {samples} captioned images as webdataset shards in {shards}", file=sys.stderr)
    synthetic.write_shards(shards, samples, shard_size=512, image_size=64, seed=0)
    recipe = load_recipe("tiny", [f"data.train={shards}", f"train.output={out}", f"train.steps={steps}",
                                  f"data.workers={workers}", f"train.checkpoint_every={max(1, steps // 3)}"])
    print(f"[2/3] training {recipe.loss.method} ({recipe.model.arch}) for {steps} steps", file=sys.stderr)
    from cloob.train import train

    summary = train(recipe)
    print("[3/3] image-to-text retrieval on 256 held-out pairs", file=sys.stderr)
    acc = heldout_retrieval(summary["checkpoint"], recipe.model.arch)
    print(f"\nretrieval top-1 among 256 held-out pairs: {acc:.1%} (chance {1 / 256:.1%})")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics:    {summary['run_dir']}/metrics.jsonl  (tensorboard --logdir {summary['run_dir']})")
    print(f"time:       {time.time() - t0:.0f} s")
    return {**summary, "heldout_top1": acc}


@torch.no_grad()
def heldout_retrieval(checkpoint_dir: str, arch: str, n: int = 256, seed: int = 12345) -> float:
    """Top-1 image-to-text retrieval among n freshly generated pairs (unseen seed)."""
    import random

    import open_clip

    from cloob.checkpoint import MODEL_FILE
    from cloob.model import MODEL_CONFIGS_DIR

    open_clip.add_model_config(MODEL_CONFIGS_DIR)
    model, _, val_tf = open_clip.create_model_and_transforms(arch, pretrained=f"{checkpoint_dir}/{MODEL_FILE}")
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    rng = random.Random(seed)
    pairs = [synthetic.sample(rng, 64) for _ in range(n)]
    images = torch.stack([val_tf(img) for img, _, _ in pairs])
    texts = tokenizer([cap for _, cap, _ in pairs])
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(texts, normalize=True)
    # Several held-out captions can be identical; a hit is any caption equal to the true one.
    captions = [cap for _, cap, _ in pairs]
    pred = (img @ txt.T).argmax(dim=1).tolist()
    return sum(captions[p] == captions[i] for i, p in enumerate(pred)) / n
