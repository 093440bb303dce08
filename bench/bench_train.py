"""Training step throughput of the tiny model: our trainer (CLIP and CLOOB) vs open_clip's training script.

    ours:      python -m cloob.train tiny data.train=<shards> loss.method={clip,cloob} ...
    open_clip: open_clip_train.main.main([...]) (the training script shipped in the open_clip_torch
               wheel), run through a small `python -c` wrapper that first registers our tiny model
               configs with open_clip.add_model_config(cloob.model.MODEL_CONFIGS_DIR)

Both train cloob-tiny-vit on the SAME webdataset shards (generated once with
cloob.data.synthetic.write_shards, img2dataset layout, 512 samples per shard, 64 px JPEGs), with the
same batch size, number of dataloader workers, shard resampling (with replacement), fp32, CPU, the
default torch thread count, AdamW (lr 1e-3, wd 0.1, betas 0.9/0.999, eps 1e-8) and a 20-step linear
warmup followed by a cosine schedule. Each run is a fresh subprocess; runs are strictly sequential and
alternate between implementations (round r runs ours-clip, open_clip, ours-cloob; even rounds
reversed) so that slow drift in machine load spreads over all of them. The median over rounds is
reported, and the best run (on a machine shared with other work, the least disturbed one).

Both runs are one epoch of exactly `warmup + steps` optimizer steps (rounded up to a multiple of the
worker count, as open_clip rounds its epoch up to whole batches per worker): ours gets
data.num_samples = total_steps x batch, open_clip --train-num-samples the same, so neither side
restarts its data loader mid-measurement.

Measurement: wall-clock time over the steps after the first `--warmup` steps (model/loader start-up,
shuffle-buffer fill), from each trainer's own periodic logs:
- ours: <run_dir>/metrics.jsonl, whose samples_per_s covers the steps since the previous logged step
  (time.perf_counter at each log point); interval time = samples / samples_per_s.
- open_clip: the time between its "Train Epoch ..." log records (a logging handler added by the
  wrapper records each record's creation time, full precision; open_clip's own per-window value is
  printed with only 3 decimals). Its first record is after batch 1, then after batches 1+k, 1+2k, ...
  and the last one, so its measured window starts one step later than ours.
Throughput = samples in the measured window / time of the window (not a mean of per-interval rates).

Other models, precisions and devices (bench/gpu_check runs RN50 in bf16 on a GPU this way):
--recipe cloob_rn50_cc3m --arch RN50 --precision bf16 --device cuda --image-size 256. ours gets
train.precision=bf16 (autocast bf16, fp32 weights), open_clip --precision amp_bf16 (the same); for a
recipe other than tiny, ours also gets open_clip's schedule (cosine, 20 warmup steps). --json writes
every run's figures, after each run.

Usage: python bench/bench_train.py [--steps 100] [--warmup 20] [--batch-size 64] [--workers 2]
                                   [--samples 4096] [--data DIR] [--repeats 2] [--log-every 10]
                                   [--methods clip,cloob] [--recipe tiny] [--arch A] [--precision fp32]
                                   [--device cpu] [--image-size 64] [--json PATH] [--write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib.metadata as _md
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from report import write_section

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "## Training step throughput (tiny model, CPU)"
ARCH = "cloob-tiny-vit"  # the tiny recipe's
SHARD_SIZE = 512
IMAGE_SIZE = 64
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}  # ours: autocast, fp32 weights
LR, WD, BETA1, BETA2, EPS = 1e-3, 0.1, 0.9, 0.999, 1e-8  # open_clip gets ours (tiny.yaml) explicitly

# Runs open_clip's own training script after registering our model configs. The extra logging
# handler only records when each "Train Epoch" line is emitted; the training loop is untouched.
OPEN_CLIP_WRAPPER = """\
import logging, os, sys
import open_clip, cloob.model
open_clip.add_model_config(cloob.model.MODEL_CONFIGS_DIR)

class _Stamps(logging.Handler):
    def __init__(self, path):
        super().__init__()
        self.f = open(path, "a")
    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Train Epoch"):
            self.f.write(repr(record.created) + "\\t" + msg + "\\n")
            self.f.flush()

logging.root.addHandler(_Stamps(os.environ["BENCH_TRAIN_STAMPS"]))
from open_clip_train.main import main
rc = main(sys.argv[1:])
sys.exit(0 if rc is None else (1 if rc else 0))
"""


@dataclass
class Run:
    impl: str  # "ours" | "open_clip"
    method: str  # "clip" | "cloob"
    rep: int
    samples_per_s: float = float("nan")
    steps_measured: int = 0
    wall_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0
    error: str = ""
    cmd: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.impl}-{self.method}"


# --------------------------------------------------------------------------------------------------
# Parsing the two trainers' logs
# --------------------------------------------------------------------------------------------------


def steady_rate_ours(metrics_jsonl: Path, batch_size: int, warmup: int) -> tuple[float, int]:
    """(samples/s, steps) over the logged intervals that start at or after step `warmup`."""
    prev, samples, seconds, steps = 0, 0.0, 0.0, 0
    for line in metrics_jsonl.read_text().splitlines():
        rec = json.loads(line)
        step, rate = int(rec["step"]), float(rec["samples_per_s"])
        if prev >= warmup and step > prev:
            n = (step - prev) * batch_size
            samples += n
            seconds += n / rate
            steps += step - prev
        prev = step
    if steps == 0:
        raise RuntimeError(f"no logged interval after step {warmup} in {metrics_jsonl}")
    return samples / seconds, steps


_OC_LINE = re.compile(r"^(?P<t>[\d.]+)\tTrain Epoch: \d+ \[\s*(?P<n>\d+)/\s*\d+")


def steady_rate_open_clip(stamps: Path, batch_size: int, warmup: int) -> tuple[float, int]:
    """(samples/s, steps) from the times of open_clip's log records after batch `warmup`."""
    points = []  # (batches done, time)
    for line in stamps.read_text().splitlines():
        m = _OC_LINE.match(line)
        if m:
            points.append((int(m["n"]) // batch_size, float(m["t"])))
    start = next((p for p in points if p[0] >= warmup), None)
    if start is None or points[-1][0] <= start[0]:
        raise RuntimeError(f"no open_clip log window after batch {warmup} in {stamps}: {points}")
    steps = points[-1][0] - start[0]
    return steps * batch_size / (points[-1][1] - start[1]), steps


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def ours_cmd(data: Path, out: Path, method: str, total_steps: int, args) -> list[str]:
    extra = [] if args.recipe == "tiny" else [f"model.arch={args.arch}", "schedule.name=cosine", "schedule.warmup_steps=20"]
    return [sys.executable, "-m", "cloob.train", args.recipe,
            f"data.train={data}", f"data.num_samples={total_steps * args.batch_size}",
            f"data.workers={args.workers}", f"loss.method={method}",
            f"train.output={out}", f"train.steps={total_steps}", f"train.batch_size={args.batch_size}",
            f"train.device={args.device}", f"train.precision={args.precision}", f"train.log_every={args.log_every}",
            f"train.checkpoint_every={10 * total_steps}", "train.progress=false", "train.resume=false", *extra]


def open_clip_args(shards: str, logs: Path, total_steps: int, args) -> list[str]:
    return ["--train-data", shards, "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(total_steps * args.batch_size), "--model", args.arch,
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--epochs", "1",
            "--lr", str(LR), "--wd", str(WD), "--beta1", str(BETA1), "--beta2", str(BETA2), "--eps", str(EPS),
            "--warmup", "20", "--lr-scheduler", "cosine", "--precision", OPEN_CLIP_PRECISION[args.precision],
            "--device", args.device,
            "--logs", str(logs), "--name", "run", "--save-frequency", "0", "--report-to", "",
            "--log-every-n-steps", str(args.log_every), "--seed", "0"]


def run_once(run: Run, data: Path, shards_pattern: str, work: Path, total_steps: int, args) -> Run:
    out = work / f"{run.label}-{run.rep}"
    out.mkdir(parents=True)
    log_path = out / "console.log"
    env = _child_env()
    if run.impl == "ours":
        run.cmd = ours_cmd(data, out, run.method, total_steps, args)
    else:
        stamps = out / "stamps.tsv"
        env["BENCH_TRAIN_STAMPS"] = str(stamps)
        run.cmd = [sys.executable, "-c", OPEN_CLIP_WRAPPER,
                   *open_clip_args(shards_pattern, out / "logs", total_steps, args)]
    run.load_before = _loadavg()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(run.cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    run.wall_s = time.perf_counter() - t0
    run.load_after = _loadavg()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        run.error = f"exit {proc.returncode}: " + " | ".join(tail)
        return run
    try:
        if run.impl == "ours":
            metrics = glob.glob(str(out / "runs" / "*" / "metrics.jsonl"))
            if len(metrics) != 1:
                raise RuntimeError(f"expected one metrics.jsonl under {out}/runs, found {metrics}")
            run.samples_per_s, run.steps_measured = steady_rate_ours(Path(metrics[0]), args.batch_size, args.warmup)
        else:
            run.samples_per_s, run.steps_measured = steady_rate_open_clip(stamps, args.batch_size, args.warmup)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        run.error = f"{type(e).__name__}: {e}"
    return run


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _median(runs: list[Run]) -> float:
    vals = [r.samples_per_s for r in runs if not r.error]
    return statistics.median(vals) if vals else float("nan")


def table(runs: list[Run], args) -> str:
    oc = _median([r for r in runs if r.impl == "open_clip"])
    best_oc = max((r.samples_per_s for r in runs if r.impl == "open_clip" and not r.error), default=float("nan"))
    rows = ["| implementation | method | batch size | workers | steps measured | samples/s (median) "
            "| ratio vs open_clip (median) | per run (in run order) | best run | ratio vs open_clip (best) |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    order = [("ours", m) for m in args.methods] + [("open_clip", "clip")]
    for impl, method in order:
        rs = [r for r in runs if r.impl == impl and r.method == method]
        if not rs:
            continue
        med = _median(rs)
        steps = sorted({r.steps_measured for r in rs if not r.error})
        per_run = ", ".join("failed" if r.error else f"{r.samples_per_s:.1f}" for r in rs)
        ratio = med / oc if oc == oc and oc > 0 and med == med else float("nan")
        best = max((r.samples_per_s for r in rs if not r.error), default=float("nan"))
        ratio_best = best / best_oc if best_oc == best_oc and best_oc > 0 and best == best else float("nan")
        name = "ours (cloob.train)" if impl == "ours" else "open_clip_train.main"
        method_txt = {"clip": "CLIP (InfoNCE)", "cloob": "CLOOB (InfoLOOB + Hopfield)"}.get(method, method)
        rows.append(f"| {name} | {method_txt} | {args.batch_size} | {args.workers} | "
                    f"{'/'.join(map(str, steps)) or '-'} | {med:.1f} | {_x(ratio)} | {per_run} | "
                    f"{best:.1f} | {_x(ratio_best)} |")
    return "\n".join(rows)


def _x(ratio: float) -> str:
    return "-" if ratio != ratio else f"{ratio:.2f}x"


def machine(device: str = "cpu") -> str:
    cpu = "unknown CPU"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import torch

    def ver(pkg):
        try:
            return _md.version(pkg)
        except _md.PackageNotFoundError:
            return "?"

    gpu = f"; GPU: {torch.cuda.get_device_name(0)}" if device == "cuda" and torch.cuda.is_available() else ""
    return (f"CPU: {cpu}, {os.cpu_count()} logical cores (torch threads: {torch.get_num_threads()}){gpu}; "
            f"torch {torch.__version__}, open_clip_torch {ver('open_clip_torch')}, "
            f"webdataset {ver('webdataset')}, Python {sys.version.split()[0]}")


def command() -> str:
    exe = sys.executable
    rel = os.path.relpath(exe, ROOT)
    exe = rel if not rel.startswith("..") else exe
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return shlex.join([exe, script, *sys.argv[1:]])


def _display_cmd(cmd: list[str], work: Path, data: Path) -> str:
    parts = []
    for a in cmd:
        if a == OPEN_CLIP_WRAPPER:
            a = "<wrapper: open_clip.add_model_config(cloob.model.MODEL_CONFIGS_DIR); open_clip_train.main.main(argv)>"
        parts.append(a.replace(str(data), "<shards>").replace(str(work), "<tmp>"))
    parts[0] = "python"
    return shlex.join(parts)


def _write_json(args, runs: list[Run], work: Path, data: Path, tbl: str = "") -> None:
    out = {"arch": args.arch, "recipe": args.recipe, "precision": args.precision, "device": args.device,
           "batch_size": args.batch_size, "workers": args.workers, "warmup": args.warmup, "steps": args.steps,
           "machine": machine(args.device), "command": command(), "table": tbl,
           "runs": [{**asdict(r), "cmd": _display_cmd(r.cmd, work, data) if r.cmd else ""} for r in runs]}
    Path(args.json).write_text(json.dumps(out, indent=1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="measured steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=20, help="steps discarded at the start of each run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="dataloader workers (both trainers)")
    p.add_argument("--samples", type=int, default=4096, help="samples to generate into the shards")
    p.add_argument("--data", default=None, help="folder for the shards (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=2, help="runs per (implementation, method); median reported")
    p.add_argument("--log-every", type=int, default=10, help="log interval (steps) of both trainers")
    p.add_argument("--methods", default="clip,cloob", help="our loss.method values to run")
    p.add_argument("--recipe", default="tiny", help="our recipe (cloob/recipes/<name>.yaml)")
    p.add_argument("--arch", default=ARCH, help="model (both trainers); a recipe other than tiny gets model.arch=<arch>")
    p.add_argument("--precision", default="fp32", choices=sorted(OPEN_CLIP_PRECISION))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="side of the generated JPEGs")
    p.add_argument("--json", default="", help="write every run's figures here (JSON, rewritten after each run)")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    p.add_argument("--write", action="store_true", help=f"update '{SECTION}' in BENCHMARKS.md")
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.warmup % args.log_every:
        p.error("--warmup must be a multiple of --log-every (the measured window starts at a log point)")
    workers = max(1, args.workers)
    total_steps = math.ceil((args.warmup + args.steps) / workers) * workers

    sys.path.insert(0, str(ROOT))
    from cloob.data.synthetic import write_shards

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = Path(args.data).resolve() if args.data else work / "shards"
    tars = write_shards(data, args.samples, shard_size=SHARD_SIZE, image_size=args.image_size)
    shards_pattern = str(data / f"{{00000..{len(tars) - 1:05d}}}.tar") if len(tars) > 1 else str(tars[0])
    print(f"{len(tars)} shards ({args.samples} samples) in {data}; {total_steps} steps per run, "
          f"first {args.warmup} discarded; runs in {work}", file=sys.stderr)

    order = [("ours", "clip"), ("open_clip", "clip")] + [("ours", m) for m in args.methods if m != "clip"]
    order = [o for o in order if o[0] == "open_clip" or o[1] in args.methods]
    runs: list[Run] = []
    for rep in range(args.repeats):
        for impl, method in (order if rep % 2 == 0 else order[::-1]):
            r = run_once(Run(impl, method, rep), data, shards_pattern, work, total_steps, args)
            runs.append(r)
            status = r.error or f"{r.samples_per_s:.1f} samples/s over {r.steps_measured} steps"
            print(f"[{rep}] {r.label:16s} {status}  (wall {r.wall_s:.0f} s, load {r.load_before:.1f}"
                  f" -> {r.load_after:.1f})", file=sys.stderr, flush=True)
            if args.json:
                _write_json(args, runs, work, data)

    tbl = table(runs, args)
    print(tbl)
    if args.json:
        _write_json(args, runs, work, data, tbl)
    failed = [r for r in runs if r.error]
    for r in failed:
        print(f"FAILED {r.label} rep {r.rep}: {r.error}", file=sys.stderr)

    if args.write:
        default = (args.recipe, args.arch, args.precision, args.device) == ("tiny", ARCH, "fp32", "cpu")
        section = SECTION if default else f"## Training step throughput ({args.arch}, {args.precision}, {args.device})"
        loads = [x for r in runs for x in (r.load_before, r.load_after) if x == x]
        first = {}
        for r in runs:
            first.setdefault(r.label, r)
        run_log = "; ".join(
            f"{r.label} {'failed' if r.error else f'{r.samples_per_s:.0f}'} ({r.load_before:.1f} -> {r.load_after:.1f})"
            for r in runs)
        cmds = "\n".join(_display_cmd(first[k].cmd, work, data) for k in first)
        date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        text = (
            f"{section}\n\n"
            f"Training throughput of `{args.arch}` ({args.precision}, {args.device}) with our trainer "
            f"(`python -m cloob.train {args.recipe}`) and "
            f"with open_clip's own training script (`open_clip_train.main`, from the open_clip_torch wheel) on "
            f"the same synthetic webdataset shards ({len(tars)} x {SHARD_SIZE} samples, {args.image_size} px JPEGs, "
            f"sampled with replacement), same batch size, dataloader workers, default torch threads, AdamW "
            f"settings and warmup+cosine schedule. Each run is a fresh process of {total_steps} steps; the "
            f"first {args.warmup} are discarded and throughput is samples / wall time over the rest, from each "
            f"trainer's own logs. {args.repeats} runs per row, sequential and alternating "
            f"(ours-clip, open_clip, ours-cloob; reversed in the next round); the median is reported, and "
            f"the best run, which is the one least disturbed by other load on the machine.\n\n"
            f"- Machine: {machine(args.device)}\n"
            f"- Date: {date}\n"
            f"- Command: `{command()}`\n"
            f"- Load average (1 min, counting the benchmark's own trainer and worker processes) seen at run "
            f"starts/ends: {min(loads):.1f} to {max(loads):.1f}. The machine is shared with other work (other "
            f"jobs come and go on its cores), so absolute numbers are noisy and a run that overlaps other load "
            f"can lose more than half its throughput; compare rows of the same run only.\n\n"
            f"{tbl}\n\n"
            f"Runs in order (samples/s; 1-min load average before -> after): {run_log}.\n\n"
            f"What differs between the two loops:\n"
            f"- Loss: open_clip trains CLIP (`ClipLoss`, InfoNCE with a learnable logit scale, init 1/0.07, "
            f"clamped to 100). Ours-clip computes the same InfoNCE with the fixed inv_tau of the tiny recipe "
            f"(30, `learn_inv_tau: false`), so ours-clip vs open_clip is the like-for-like comparison. "
            f"Ours-cloob adds the four Hopfield retrievals and InfoLOOB; its gap to ours-clip is the cost "
            f"of CLOOB's loss at batch {args.batch_size}.\n"
            f"- Data: ours uses `ShardStream` (per-sample seeded augmentation so a resumed run replays the same "
            f"crops, batch tokenization, shuffle buffer 500, per-batch resume bookkeeping); open_clip uses its "
            f"webdataset pipeline (shuffle buffer 5000 with 1000 initial, per-sample tokenization, persistent "
            f"workers). Both read the same tars with the same number of workers.\n"
            f"- Per step, ours updates its resume bookkeeping (each batch carries its worker's stream "
            f"position and skip counts); open_clip clamps its learnable logit scale. Both log every "
            f"{args.log_every} steps (ours to metrics.jsonl and TensorBoard, open_clip to its text log). "
            f"Both save one checkpoint at the end, outside the measured window.\n\n"
            f"Per-run commands (`<shards>`: the shard folder, `<tmp>`: a fresh run folder):\n\n"
            f"```\n{cmds}\n```\n"
        )
        write_section(section, text)
        print(f"\nwrote section '{section}' in {BENCHMARKS}", file=sys.stderr)

    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # holds the shards too unless --data was given
    else:
        print(f"kept {work}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
