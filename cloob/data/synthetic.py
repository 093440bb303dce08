"""Procedurally generated image-caption pairs, written as webdataset shards in img2dataset's layout.

Each image shows one to three coloured shapes on a plain background; its caption says what is where
("a red circle and a blue square on a white background"). A tiny model learns the colour/shape words
in a few hundred steps, which makes this the offline demo and test set.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "purple": (140, 40, 180), "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Item:
    shape: str
    color: str


def _draw(draw: ImageDraw.ImageDraw, item: Item, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    fill = COLORS[item.color]
    if item.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif item.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(items: list[Item], background: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    cell = size // len(items)
    for i, item in enumerate(items):  # left to right, one column each, random size and height
        side = rng.randint(int(cell * 0.55), int(cell * 0.9))
        x0 = i * cell + rng.randint(0, cell - side)
        y0 = rng.randint(0, size - side)
        _draw(draw, item, (x0, y0, x0 + side, y0 + side))
    return img


def caption(items: list[Item], background: str) -> str:
    parts = [f"a {it.color} {it.shape}" for it in items]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{things} on a {background} background"


def draw(rng: random.Random, max_items: int = 3) -> tuple[list[Item], str]:
    """What a picture shows (its caption depends only on this): the first draws from rng."""
    n = rng.randint(1, max_items)
    items = [Item(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(n)]
    return items, rng.choice(list(BACKGROUNDS))


def sample(rng: random.Random, size: int, max_items: int = 3) -> tuple[Image.Image, str, dict]:
    items, background = draw(rng, max_items)
    meta = {"items": [it.__dict__ for it in items], "background": background}
    return render(items, background, size, rng), caption(items, background), meta


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(out_dir: str | Path, num_samples: int, shard_size: int = 256, image_size: int = 64,
                 seed: int = 0, max_items: int = 3) -> list[Path]:
    """Write NNNNN.tar (+ NNNNN_stats.json, written last) into out_dir; existing finished shards are kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num_samples, shard_size)):
        tar_path = out / f"{shard:05d}.tar"
        stats_path = out / f"{shard:05d}_stats.json"
        paths.append(tar_path)
        if stats_path.exists() and tar_path.exists():
            continue
        rng = random.Random(seed * 1_000_003 + shard)
        count = min(shard_size, num_samples - start)
        t0 = time.time()
        tmp = tar_path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(count):
                key = f"{shard:05d}{i:04d}"
                img, text, meta = sample(rng, image_size, max_items)
                _add(tar, f"{key}.jpg", _jpeg(img))
                _add(tar, f"{key}.txt", text.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": text, **meta}).encode())
        os.replace(tmp, tar_path)
        stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": time.time() - t0, "status_dict": {"success": count}}
        tmp_stats = stats_path.with_suffix(".json.tmp")
        tmp_stats.write_text(json.dumps(stats, indent=2))
        os.replace(tmp_stats, stats_path)
    return paths


SHAPE_CLASSES = [f"{c} {s}" for c in COLORS for s in SHAPES]  # "red circle", ..., 18 classes


def write_class_folders(out_dir: str | Path, per_class: int, image_size: int = 64, seed: int = 0,
                        classes: list[str] | None = None) -> Path:
    """A zero-shot classification set of one-shape pictures, `<out_dir>/<class>/NNNN.jpg`, where a
    class is "<color> <shape>" (data_specs/downstream/shapes.yaml) or a colour alone, drawn as any
    shape (colors.yaml). Each class folder is written whole, then renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for ci, name in enumerate(classes or SHAPE_CLASSES):
        final = out / name
        if final.is_dir():
            continue
        color, _, shape = name.partition(" ")
        rng = random.Random(seed * 1_000_003 + ci)
        tmp = out / f".{name}.tmp"
        tmp.mkdir(exist_ok=True)
        for i in range(per_class):
            item = Item(shape or rng.choice(SHAPES), color)
            img = render([item], rng.choice(list(BACKGROUNDS)), image_size, rng)
            (tmp / f"{i:04d}.jpg").write_bytes(_jpeg(img))
        os.replace(tmp, final)
    return out
