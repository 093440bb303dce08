"""How ranks start: forked from torchrun's agent with the trainer imported (cloob.run.rank_fork, the
default) against torch's own way, a new interpreter per rank that imports it all (CLOOB_RANK_START=exec).

Each trial is one `cloob train tiny` of a few steps on synthetic shards, the two ways alternating;
it reports the CPU of the whole process tree (user + sys of every process reaped under it) and the
wall time, median over the trials, and the ratio. With more ranks than cores, or beside other work
(a test suite, a second run), the CPU is what the machine pays; on idle cores the imports of new
interpreters run side by side and the wall time moves less.

    python bench/bench_rank_start.py [--ranks 2] [--steps 4] [--trials 3] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HEADING = "## Rank start: forked from torchrun's agent against a new interpreter each (bench/bench_rank_start.py)"


def one_run(shards: Path, out: Path, ranks: int, steps: int, how: str) -> tuple[float, float]:
    """(CPU s of the tree, wall s) of one `cloob train` under the launcher, ranks started `how`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLOOB_RANK_START": how, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cloob.cli", "train", "tiny", f"data.train={shards}", f"train.output={out}",
           "train.batch_size=8", f"train.steps={steps}", "data.workers=1", "data.shuffle_buffer=16",
           "schedule.warmup_steps=1", "train.progress=false", f"--nproc-per-node={ranks}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = ap.parse_args()

    from cloob.data import synthetic

    with tempfile.TemporaryDirectory(prefix="bench-rank-start-") as tmp:
        shards = Path(tmp) / "shards"
        synthetic.write_shards(shards, 64, shard_size=16, image_size=32, seed=0)
        one_run(shards, Path(tmp) / "warm", args.ranks, 1, "exec")  # the bytecode and page caches, once
        runs: dict[str, list[tuple[float, float]]] = {"fork": [], "exec": []}
        for trial in range(args.trials):
            for how in ("fork", "exec") if trial % 2 == 0 else ("exec", "fork"):
                runs[how].append(one_run(shards, Path(tmp) / f"{how}{trial}", args.ranks, args.steps, how))
                print(f"trial {trial} {how}: CPU {runs[how][-1][0]:.1f} s, wall {runs[how][-1][1]:.1f} s", flush=True)

    med = {how: (statistics.median(c for c, _ in r), statistics.median(w for _, w in r)) for how, r in runs.items()}
    rows = [f"| {how} | {med[how][0]:.1f} | {med[how][1]:.1f} |" for how in ("fork", "exec")]
    machine = f"{platform.node() or 'this machine'} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    text = "\n".join([
        HEADING, "",
        f"{datetime.date.today()}, {machine}; "
        f"`cloob train tiny` with {args.ranks} ranks, {args.steps} steps, 1 DataLoader worker each, median of "
        f"{args.trials} trials each, alternating (`python bench/bench_rank_start.py --ranks {args.ranks} --steps "
        f"{args.steps} --trials {args.trials}`).", "",
        "| ranks start as | CPU of the tree, s | wall, s |", "|---|---|---|", *rows, "",
        f"Forked ranks take {med['fork'][0] / med['exec'][0]:.2f}x the CPU of new interpreters "
        f"({med['exec'][0] - med['fork'][0]:.1f} s less a run) and {med['fork'][1] / med['exec'][1]:.2f}x the wall time.",
    ])
    print(text)
    if args.write:
        from bench.report import write_section

        write_section(HEADING, text)


if __name__ == "__main__":
    main()
