"""The training input pipeline at 224 px: our DataLoader against open_clip's webdataset pipeline, per worker.

    ours:      cloob.data.stream.ShardStream under torch's DataLoader, built as cloob/train/loop.py builds
               it for the RN50 recipe (clip_rn50_cc3m: data.resampled, data.shuffle_buffer, train.batch_size;
               ReportErrors around it, preemption.worker_init, batch_size=None), with the recipe's
               transform and tokenizer (cloob.model.create_model('RN50'): open_clip's RN50 train
               preprocess, RandomResizedCrop(224, scale 0.9-1.0, bicubic) + normalise), per-sample
               seeded augmentation, batch tokenisation, and the resume bookkeeping: every batch carries
               its worker, raw position and skip counts, and the main process folds them into a
               StreamState as the trainer does.
    open_clip: open_clip_train.data.get_wds_dataset (from the installed open_clip_torch wheel) with
               --dataset-resampled, the same batch size and workers, open_clip.create_model_and_transforms
               ('RN50')'s train preprocess and open_clip.get_tokenizer('RN50'): what open_clip_train.main
               builds for `--model RN50 --train-data ... --dataset-type webdataset --dataset-resampled`
               (its own shuffle buffer: 5,000 raw samples, 1,000 before the first).

The data: photo-like JPEGs (below) served from 127.0.0.1 and prepared with our `cloob prepare` (a table
spec; img2dataset underneath) at image_size 256 and at 384, resize_mode keep_ratio (shorter side = the
size), encode_quality 95, as data_specs/cc3m.yaml sets. Both pipelines read the same shards.

Photo-like pictures: the demo's shapes on flat colour compress far better than photos do. Each source
picture here (640x480, 800x533, 500x500, 480x640 or 1024x683) is 1/f^1.3 noise in luminance and two
chroma fields (natural images' power spectrum falls about as 1/f^2 to 1/f^3), a few filled shapes for
edges, lightly blurred, then a second 1/f texture field and Gaussian grain on top, saved at quality 90.
After img2dataset's resize they are about 38 KB at 256 px and 74 KB at 384 px (JPEG entropy decoding
scales with the bytes and the IDCT with the pixels, so the decoder's work is about that of photos of these
sizes; data_specs/cc3m.yaml estimates ~25 KB a sample for CC3M at 256, so these are on the heavy side).
Captions: 8-16 random words.

Timing: each (pipeline, image size, workers) run is a fresh process; runs alternate (ours first in odd
rounds, open_clip first in even ones) and are strictly sequential. In a run the first 2k batches are
discarded (worker start-up, shuffle-buffer fill), the next `--batches` x k are timed; samples/s =
samples / seconds, per worker = samples/s / k. Median over rounds. No model runs. The machine is shared, so
each run also counts the CPU seconds (user + system) its worker processes spent in the timed part:
samples per worker CPU-second is the rate of one dedicated core, which waiting for a core does not lower.

Stages (--stages, one fresh process, one thread, the same shards): the per-sample cost of decoding, the
crop + resize, to-tensor + normalise and tokenisation, and of decoding with PIL's draft mode at 1/2 scale
(the JPEG decoder's DCT scaling) followed by the same crop. See BENCHMARKS.md for why draft cannot keep
the augmentation's distribution at these stored sizes.

Usage: python bench/bench_pipeline.py [--sizes 256,384] [--workers 1,2] [--rounds 2] [--batches 6]
                                      [--photos 400] [--data DIR] [--write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RECIPE = "clip_rn50_cc3m"
ARCH = "RN50"
SOURCE_SIZES = [(640, 480), (800, 533), (500, 500), (480, 640), (1024, 683)]
WORDS = ("a the man woman dog cat car street city beach tree house people child old new red blue green small "
         "large view of in on at with near under over during sunset night morning river mountain field "
         "building window table food plate flowers garden road bridge boat water sky clouds snow portrait "
         "player team game stage concert crowd family wedding bride vintage illustration vector design").split()


# -- the photo-like pictures ---------------------------------------------------------------------------
def photo(seed: int, w: int, h: int):
    """A photo-like RGB picture (PIL): 1/f noise fields, shapes, texture and grain (module docstring)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amp = 1.0 / f ** 1.3
    amp[0, 0] = 0.0

    def field():
        x = np.fft.irfft2(amp * np.exp(1j * rng.uniform(0, 2 * np.pi, amp.shape)), s=(h, w))
        return x / (x.std() + 1e-9)

    lum, c1, c2 = field(), field(), field()
    mix = rng.normal(0, 12, (2, 3))
    img = rng.uniform(60, 190, 3)[None, None, :] + 38 * lum[..., None] + c1[..., None] * mix[0] + c2[..., None] * mix[1]
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw, r = ImageDraw.Draw(im), random.Random(seed)
    for _ in range(r.randint(2, 6)):
        x0, y0 = r.uniform(-0.2, 0.9) * w, r.uniform(-0.2, 0.9) * h
        box = [x0, y0, x0 + r.uniform(0.1, 0.6) * w, y0 + r.uniform(0.1, 0.6) * h]
        (draw.ellipse if r.random() < 0.5 else draw.rectangle)(box, fill=tuple(r.randint(0, 255) for _ in range(3)))
    a = np.asarray(im.filter(ImageFilter.GaussianBlur(0.8))).astype(np.float32)
    a = a + 14 * field()[..., None] + rng.normal(0, 3.0, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def photo_jpeg(seed: int, quality: int = 90) -> bytes:
    w, h = random.Random(seed).choice(SOURCE_SIZES)
    buf = io.BytesIO()
    photo(seed, w, h).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def caption(seed: int) -> str:
    r = random.Random(seed + 7919)
    return " ".join(r.choice(WORDS) for _ in range(r.randint(8, 16)))


def make_data(root: Path, photos: int, sizes: list[int], shard_size: int) -> dict[int, Path]:
    """Shards of `photos` photo-like pictures per size, made with `cloob prepare` (cached in root)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cloob.prepare.demo_server import DemoHandler, DemoServer

    out = {s: root / f"keep_ratio_{s}" for s in sizes}
    todo = [s for s in sizes if not (out[s] / "_cloob" / "manifest.json").exists()]
    if not todo:
        return out
    src = root / f"sources_{photos}"
    src.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(photos):
        p = src / f"{i}.jpg"
        if not p.exists():
            p.write_bytes(photo_jpeg(i))
    print(f"{photos} source pictures in {src} ({time.perf_counter() - t0:.0f} s)", flush=True)

    class Handler(DemoHandler):
        def route(self, path):
            name = path.strip("/").removeprefix("photo/")
            f = src / name
            if not path.startswith("/photo/") or not f.is_file():
                return 404, b"not found\n", "text/plain"
            return 200, f.read_bytes(), "image/jpeg"

    with DemoServer(Handler) as server:
        table = root / f"rows_{photos}.parquet"
        pq.write_table(pa.Table.from_pylist([{"url": f"{server.url}/photo/{i}.jpg", "caption": caption(i)}
                                             for i in range(photos)]), table)
        for s in todo:
            spec = {"name": f"photos{s}", "source": {"kind": "table", "path": str(table)},
                    "download": {"image_size": s, "resize_mode": "keep_ratio", "encode_format": "jpg",
                                 "encode_quality": 95, "shard_size": shard_size, "processes": 2, "threads": 16,
                                 "timeout": 10, "retries": 1}}
            spec_file = root / f"spec_{s}.json"
            spec_file.write_text(json.dumps(spec))
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cloob.cli", "prepare", str(spec_file), "--out", str(out[s]),
                            "--no-progress"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            print(f"cloob prepare at {s} px: {out[s]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# -- the two pipelines ---------------------------------------------------------------------------------
def recipe_data():
    """(batch_size, shuffle_buffer, workers, resampled) of the RN50 recipe."""
    from cloob.config import load_recipe

    r = load_recipe(RECIPE)
    return r.train.batch_size, r.data.shuffle_buffer, r.data.workers, r.data.resampled


def recipe_decoder() -> str:
    """The RN50 recipe's data.decoder (pil when unset)."""
    from cloob.config import load_recipe

    return load_recipe(RECIPE).data.decoder or "pil"


def ours(folder: str, workers: int, batch_size: int, shuffle_buffer: int, seed: int = 0, decoder: str = "pil"):
    """Batches (image, text) of our training pipeline, built as cloob/train/loop.py builds it (data.decoder:
    pil, open_clip's transform on PIL images, or torchvision, cloob.data.tensor_transform)."""
    import torch
    from torch.utils.data import DataLoader

    from cloob.data.shards import list_shards
    from cloob.data.stream import ShardStream, StreamState
    from cloob.model import create_model
    from cloob.train import preemption
    from cloob.train.failures import ReportErrors, checked

    shards = list_shards(folder)
    _, train_tf, _, tokenizer = create_model(ARCH)
    if decoder == "torchvision":
        from cloob.data.tensor_transform import TensorTrainTransform

        train_tf = TensorTrainTransform.of(train_tf)
    ds = ShardStream(shards.urls, batch_size=batch_size, image_transform=train_tf, tokenizer=tokenizer, seed=seed,
                     resampled=True, shuffle_buffer=shuffle_buffer,
                     expected_counts={u: c for u, c in zip(shards.urls, shards.counts) if c},
                     exclude_keys=shards.exclude_keys)
    state = StreamState()
    ds.start_epoch(0, state, steps_per_epoch=10**6)
    loader = DataLoader(ReportErrors(ds, run_dir=str(folder), data=str(folder)), batch_size=None,
                        num_workers=workers, worker_init_fn=preemption.worker_init, pin_memory=False,
                        generator=torch.Generator().manual_seed(seed), timeout=600 if workers else 0)
    for batch in checked(iter(loader)):
        state.update(batch)  # the trainer's resume bookkeeping (progress.stream.update)
        yield batch["image"], batch["text"]


def open_clip_pipeline(folder: str, workers: int, batch_size: int, seed: int = 0):
    """Batches (image, text) of open_clip_train.data.get_wds_dataset with RN50's preprocess and tokenizer."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    from cloob.data.shards import list_shards

    shards = list_shards(folder)
    _, preprocess_train, _ = open_clip.create_model_and_transforms(ARCH)
    tokenizer = open_clip.get_tokenizer(ARCH)
    args = argparse.Namespace(train_data="::".join(shards.urls), val_data=None, dataset_resampled=True,
                              train_num_samples=10**7, train_data_upsampling_factors=None, seed=seed,
                              batch_size=batch_size, world_size=1, workers=workers)
    data = get_wds_dataset(args, preprocess_train, is_train=True, epoch=0, tokenizer=tokenizer)
    data.set_epoch(0)
    yield from data.dataloader


# -- one timed run (a fresh process) ------------------------------------------------------------------
def child(impl: str, folder: str, workers: int, batch_size: int, shuffle_buffer: int, batches: int,
          decoder: str = "pil") -> dict:
    it = ours(folder, workers, batch_size, shuffle_buffer, decoder=decoder) if impl == "ours" else \
        open_clip_pipeline(folder, workers, batch_size)
    import psutil

    me = psutil.Process()

    def cpu() -> tuple[float, float]:
        """CPU seconds (user + system) of the worker processes, and of this (the main) process."""
        workers_s = 0.0
        for p in me.children(recursive=True):
            try:
                t = p.cpu_times()
                workers_s += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        t = me.cpu_times()
        return workers_s, t.user + t.system

    t_start = time.perf_counter()
    for _ in range(2 * max(1, workers)):
        next(it)
    t0, (w0, m0) = time.perf_counter(), cpu()
    n = 0
    for _ in range(batches * max(1, workers)):
        image, _ = next(it)
        n += len(image)
    seconds, (w1, m1) = time.perf_counter() - t0, cpu()
    rate = n / seconds
    return {"impl": impl, "workers": workers, "samples": n, "seconds": seconds, "samples_per_s": rate,
            "per_worker": rate / max(1, workers), "startup_s": t0 - t_start,
            "per_cpu_s": n / (w1 - w0) if workers else n / (m1 - m0), "main_cpu_s": m1 - m0,
            "load": " ".join(f"{v:.2f}" for v in os.getloadavg())}


def stages(folder: str, n: int) -> dict:
    """Per-sample milliseconds of each step of the transform, one thread, n samples of the shards."""
    import tarfile

    import open_clip
    import torch
    from PIL import Image

    from cloob.data.shards import list_shards
    from cloob.model import create_model

    torch.set_num_threads(1)
    _, tf, _, tokenizer = create_model(ARCH)
    crop, to_tensor_norm = tf.transforms[0], open_clip.transform.Compose(tf.transforms[1:])
    samples = []
    for url in list_shards(folder).urls:
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, m in members.items():
                if name.endswith(".jpg"):
                    txt = members.get(name[:-4] + ".txt")
                    samples.append((tar.extractfile(m).read(), tar.extractfile(txt).read().decode() if txt else ""))
                if len(samples) >= n:
                    break
        if len(samples) >= n:
            break
    t = dict.fromkeys(("decode", "crop_resize", "tensor_normalise", "tokenise", "decode_draft_half",
                       "crop_resize_after_draft"), 0.0)
    kb, sizes, drafted = 0.0, set(), set()
    for jpg, _ in samples:
        kb += len(jpg) / 1024
        t0 = time.perf_counter()
        with Image.open(io.BytesIO(jpg)) as im:
            img = im.convert("RGB")
        t1 = time.perf_counter()
        c = crop(img)
        t2 = time.perf_counter()
        to_tensor_norm(c)
        t3 = time.perf_counter()
        with Image.open(io.BytesIO(jpg)) as im:
            im.draft("RGB", (im.width // 2, im.height // 2))
            small = im.convert("RGB")
        t4 = time.perf_counter()
        crop(small)
        t5 = time.perf_counter()
        sizes.add(img.size)
        drafted.add(small.size)
        t["decode"] += t1 - t0
        t["crop_resize"] += t2 - t1
        t["tensor_normalise"] += t3 - t2
        t["decode_draft_half"] += t4 - t3
        t["crop_resize_after_draft"] += t5 - t4
    captions = [c for _, c in samples]
    t0 = time.perf_counter()
    for i in range(0, len(captions), 128):
        tokenizer(captions[i:i + 128])
    t["tokenise"] = time.perf_counter() - t0
    ms = {k: 1000 * v / len(samples) for k, v in t.items()}
    short, dshort = [min(s) for s in sizes], [min(s) for s in drafted]
    return {"samples": len(samples), "kb_mean": kb / len(samples), "ms": ms,
            "shorter_side": [min(short), max(short)], "drafted_shorter_side": [min(dshort), max(dshort)]}


def run_child(argv: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"child {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report ----------------------------------------------------------------------------------------
HEADING = "## Input pipeline at 224 px: ours vs open_clip's webdataset pipeline (RN50 recipe, CPU)"


def report(info: dict) -> tuple[str, str]:
    """(heading, section text) of BENCHMARKS.md from a run's figures (also from a saved --json)."""
    runs, stage_rows = info["runs"], {int(k): v for k, v in info["stages"].items()}
    heading = HEADING if info.get("decoder", "pil") == "pil" else HEADING + ", our data.decoder=torchvision"

    def pick(impl, s, k):
        return [x for x in runs if (x["impl"], x["size"], x["workers"]) == (impl, s, k)]

    lines = ["| stored size (keep_ratio) | workers | ours, samples/s per worker (median) | open_clip (median) | "
             "ratio of medians | ratio in each round (median) | ours per run | open_clip per run | ours, samples "
             "per worker CPU-second (median) | open_clip (median) | ratio |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for s in info["sizes"]:
        for k in info["workers"]:
            o, c = pick("ours", s, k), pick("open_clip", s, k)
            paired = [a["per_worker"] / b["per_worker"] for a in o for b in c if a["round"] == b["round"]]
            mo, mc = statistics.median(x["per_worker"] for x in o), statistics.median(x["per_worker"] for x in c)
            co, cc = statistics.median(x["per_cpu_s"] for x in o), statistics.median(x["per_cpu_s"] for x in c)
            each = ", ".join(f"{r:.2f}" for r in paired)
            per_o, per_c = (", ".join(f"{x['per_worker']:.0f}" for x in xs) for xs in (o, c))
            lines.append(f"| {s} px | {k} | {mo:.1f} | {mc:.1f} | {mo / mc:.2f} | {statistics.median(paired):.2f} "
                         f"({each}) | {per_o} | {per_c} | {co:.1f} | {cc:.1f} | {co / cc:.2f} |")
    slines = ["| stored size | JPEG KB (mean) | decode ms | crop + resize ms | to tensor + normalise ms | "
              "tokenise ms | sum ms (decode's share) | decode with draft 1/2 ms | crop + resize after draft ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in info["sizes"]:
        m = stage_rows[s]["ms"]
        total = m["decode"] + m["crop_resize"] + m["tensor_normalise"] + m["tokenise"]
        slines.append(f"| {s} px | {stage_rows[s]['kb_mean']:.1f} | {m['decode']:.2f} | {m['crop_resize']:.2f} | "
                      f"{m['tensor_normalise']:.2f} | {m['tokenise']:.3f} | {total:.2f} ({m['decode'] / total:.0%}) | "
                      f"{m['decode_draft_half']:.2f} | {m['crop_resize_after_draft']:.2f} |")
    loads = [float(x["load"].split()[0]) for x in runs]
    text = (f"{heading}\n\n- Machine: {info['machine']}\n- Date: {info['date']}\n- Command: `{info['command']}`\n"
            f"- Load average (1 min) at start {info['load_start'].split()[0]}, at run ends {min(loads):.1f} to "
            f"{max(loads):.1f}: the machine is shared, other sessions' work competes for its 2 cores, so runs "
            "differ by up to 2x; compare the two pipelines within a round (the sixth column), or by CPU time: samples per "
            "CPU-second of the worker processes (user + system, from psutil) count only the work, not the waiting, so "
            "they are the rate of one dedicated core and hold under load (cache and hyperthread contention aside)\n"
            f"- Our data.decoder: {info.get('decoder', 'pil')} (cloob/data/tensor_transform.py for torchvision)\n"
            f"- Batch size {info['batch_size']} (the recipe's), our shuffle buffer {info['shuffle_buffer']} (the "
            f"recipe's), open_clip's its own; {info['photos']} photo-like pictures prepared by `cloob prepare` "
            f"(keep_ratio, quality 95) in shards of {info['shard_size']}; {info['rounds']} rounds, alternating; "
            f"{info['batches']} timed batches per worker per run, after 2 per worker discarded\n\n"
            + "\n".join(lines) + f"\n\nPer-sample cost by step (one process, one thread, {info['stage_samples']} "
            "samples of the same shards; decode = PIL open + convert to RGB; crop + resize = the RN50 "
            "RandomResizedCrop(224, scale 0.9-1.0, bicubic, antialias); draft 1/2 = `Image.draft('RGB', "
            "(w // 2, h // 2))` before the conversion, then the same crop on the half-size picture; wall-clock "
            "times on the shared machine, so their sums exceed the CPU-time rates above: read the shares):\n\n"
            + "\n".join(slines) + "\n\nSee the docstring of bench/bench_pipeline.py for the method.\n")
    return heading, text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,384")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", type=int, default=6, help="timed batches per worker in each run")
    p.add_argument("--photos", type=int, default=400)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--stage-samples", type=int, default=200)
    p.add_argument("--data", default="")
    p.add_argument("--json", default="")
    p.add_argument("--write", action="store_true")
    p.add_argument("--decoder", choices=["recipe", "pil", "torchvision"], default="recipe",
                   help="our pipeline's data.decoder (default: the RN50 recipe's)")
    p.add_argument("--report", default="", help="write the section from a saved --json instead of running")
    p.add_argument("--child", choices=["ours", "open_clip", "stages"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()

    batch_size, shuffle_buffer, recipe_workers, _ = recipe_data()
    decoder = recipe_decoder() if args.decoder == "recipe" else args.decoder
    if args.child == "stages":
        print(json.dumps(stages(args.folder, args.stage_samples)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.folder, int(args.workers), batch_size, shuffle_buffer, args.batches,
                               decoder)))
        return 0

    from bench_train import machine
    from report import write_section

    if args.report:
        heading, text = report(json.loads(Path(args.report).read_text()))
        print(text)
        if args.write:
            write_section(heading, text)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    root = Path(args.data or Path(tempfile.gettempdir()) / "bench_pipeline")
    folders = make_data(root, args.photos, sizes, args.shard_size)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    runs: list[dict] = []
    stage_rows: dict[int, dict] = {}
    for s in sizes:
        stage_rows[s] = run_child(["--child", "stages", "--folder", str(folders[s]),
                                   "--stage-samples", str(args.stage_samples)], env)
        print(f"{s} px stages (ms/sample): " + ", ".join(f"{k} {v:.2f}" for k, v in stage_rows[s]["ms"].items())
              + f"; {stage_rows[s]['kb_mean']:.1f} KB a JPEG", flush=True)
    for r in range(args.rounds):
        for s in sizes:
            for k in workers:
                order = ["ours", "open_clip"] if r % 2 == 0 else ["open_clip", "ours"]
                for impl in order:
                    row = run_child(["--child", impl, "--folder", str(folders[s]), "--workers", str(k),
                                     "--batches", str(args.batches), "--decoder", decoder], env)
                    row.update(size=s, round=r)
                    runs.append(row)
                    print(f"round {r} {s} px {k} workers {impl:9s}: {row['samples_per_s']:6.1f} samples/s, "
                          f"{row['per_worker']:6.1f} per worker, {row['per_cpu_s']:6.1f} per worker CPU-second "
                          f"({row['samples']} in {row['seconds']:.1f} s; "
                          f"start-up {row['startup_s']:.1f} s; load {row['load']})", flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps({"runs": runs, "stages": stage_rows, "partial": True}))

    info = {"machine": machine(), "date": f"{_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            "command": f"python bench/bench_pipeline.py {' '.join(sys.argv[1:])}", "load_start": load_start,
            "runs": runs, "stages": stage_rows, "sizes": sizes, "workers": workers, "batch_size": batch_size,
            "shuffle_buffer": shuffle_buffer, "recipe_workers": recipe_workers, "photos": args.photos,
            "shard_size": args.shard_size, "rounds": args.rounds, "batches": args.batches,
            "stage_samples": args.stage_samples, "decoder": decoder}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    heading, text = report(info)
    print("\n" + text)
    if args.write:
        write_section(heading, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
