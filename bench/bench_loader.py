"""Training input pipeline throughput: samples/s of our DataLoader by number of worker processes, and per worker.

cloob.data.stream.ShardStream (shards drawn with replacement, a shuffle buffer, per-sample seeded
augmentation, batch tokenization) under torch's DataLoader with k worker processes, built as the
trainer builds it (cloob/train/loop.py: batch_size=None, cloob.data.workers.worker_init), with the
train transform and tokenizer of --arch (open_clip's: RandomResizedCrop to the model's input size),
on synthetic webdataset shards (cloob.data.synthetic, --image-size px JPEGs). No model runs: the
main process only takes the batches. Per k a fresh DataLoader: the first 2k batches are discarded
(worker start-up, shuffle-buffer fill), the next max(8, 4k) are timed; samples/s = batches x batch
size / seconds, and per core = samples/s / k (each worker is one process on one core; with more
workers than free cores the per-core figure drops).

Usage: python bench/bench_loader.py [--workers 1,2] [--batch-size 64] [--arch cloob-tiny-vit]
                                    [--samples 2048] [--image-size 64] [--data DIR] [--json PATH] [--write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(shards: list[str], workers: int, batch_size: int, transform, tokenizer, shuffle_buffer: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from cloob.data.stream import ShardStream
    from cloob.data.workers import worker_init

    ds = ShardStream(shards, batch_size=batch_size, image_transform=transform, tokenizer=tokenizer, seed=0,
                     resampled=True, shuffle_buffer=shuffle_buffer)
    ds.start_epoch(0)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, worker_init_fn=worker_init,
                        generator=torch.Generator().manual_seed(0), timeout=600 if workers else 0)
    skip, timed = 2 * max(1, workers), max(8, 4 * workers)
    t_start = time.perf_counter()
    it = iter(loader)
    for _ in range(skip):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(timed):
        n += len(next(it)["image"])
    seconds = time.perf_counter() - t0
    del it
    rate = n / seconds
    return {"workers": workers, "batches": timed, "samples": n, "seconds": seconds, "samples_per_s": rate,
            "per_worker": rate / max(1, workers), "startup_s": t0 - t_start}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="comma-separated numbers of DataLoader workers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--arch", default="cloob-tiny-vit")
    p.add_argument("--samples", type=int, default=2048, help="samples to generate (unless --data has them)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=500)
    p.add_argument("--data", default="", help="shard folder (generated there if missing)")
    p.add_argument("--json", default="")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()

    from bench_train import machine
    from report import write_section

    from cloob.data.synthetic import write_shards
    from cloob.model import create_model

    data = Path(args.data or tempfile.mkdtemp(prefix="bench_loader_"))
    shards = [str(t) for t in write_shards(data, args.samples, shard_size=512, image_size=args.image_size)]
    _, transform, _, tokenizer = create_model(args.arch)
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for k in [int(w) for w in args.workers.split(",")]:
        r = measure(shards, k, args.batch_size, transform, tokenizer, args.shuffle_buffer)
        r["load"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        rows.append(r)
        if args.json:  # after each k: a caller that stops this run keeps what was measured
            Path(args.json).write_text(json.dumps({"arch": args.arch, "batch_size": args.batch_size,
                                                   "image_size": args.image_size, "rows": rows, "partial": True}))
        print(f"  {k} workers: {r['samples_per_s']:.0f} samples/s, {r['per_worker']:.0f} per worker "
              f"({r['samples']} samples in {r['seconds']:.2f} s; start-up {r['startup_s']:.1f} s; load {r['load']})", flush=True)
    table = "\n".join(["| workers | samples/s | samples/s per worker | timed batches | start-up s (2k batches) |",
                       "|---:|---:|---:|---:|---:|"] +
                      [f"| {r['workers']} | {r['samples_per_s']:,.0f} | {r['per_worker']:,.0f} | {r['batches']} | "
                       f"{r['startup_s']:.1f} |" for r in rows])
    print("\n" + table)
    info = {"arch": args.arch, "batch_size": args.batch_size, "image_size": args.image_size, "shards": len(shards),
            "samples": args.samples, "machine": machine(), "load_start": load_start, "rows": rows, "table": table}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    if args.write:
        heading = f"## DataLoader throughput ({args.arch} train transform, {args.image_size} px JPEGs)"
        date = f"{_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
        write_section(heading, f"{heading}\n\n- Machine: {machine()}\n- Date: {date}\n"
                      f"- Command: `python bench/bench_loader.py {' '.join(sys.argv[1:])}`\n- Load average at start: "
                      f"{load_start}\n\n{table}\n\nSee the docstring of bench/bench_loader.py for the method.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
