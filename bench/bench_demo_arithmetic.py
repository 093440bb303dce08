"""How far `cloob demo`'s numbers move when the arithmetic changes the way it does between machines.

The same demo (same code, data, seeds) runs twice on this machine: once with the ATen kernels this
CPU picks (AVX-512 here) and once with `ATEN_CPU_CAPABILITY=avx2`, the kernels an AVX2-only CPU
runs, whose softmax and exp round differently in the last bits. That is the difference between two
machines of "the same kind" that do not share a CPU generation. Per method it reports both runs'
zero-shot top-1, the difference, and how the loss gap between the two runs grows over training
(|L_a - L_b| / |L_a| from each run's metrics.jsonl): a gap that stays near 1e-7 is rounding, one that
reaches 1e-2 is another trajectory.

    python bench/bench_demo_arithmetic.py --out /tmp/arith [--steps 500] [--write]

--write puts the table into BENCHMARKS.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HEADING = "## The demo under another CPU's kernels, {setting} (bench/bench_demo_arithmetic.py)"
CHECKPOINTS = (50, 100, 200, 300, 400, 500, 750, 1000)


def native_capability() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_demo(store: Path, capability: str | None, steps: int) -> float:
    """The demo's wall time; a store this benchmark finished before is reused, with the time it took."""
    done = store / "bench_seconds.txt"
    if done.exists():
        return float(done.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "ATEN_CPU_CAPABILITY")}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--store", str(store), "--steps", str(steps)],
                   env={**env, "PYTHONPATH": str(ROOT)}, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    done.write_text(f"{seconds:.1f}\n")
    return seconds


def setting(steps: int) -> str:
    """The demo's settings as run: each method's own overrides (cloob/studies/demo.yaml) and the steps."""
    from flows.demo import demo_recipes

    parts = [" ".join(r.split()[1:]).replace("loss.method=", "") for r in demo_recipes([0])]
    return f"{'; '.join(parts)}; {steps} steps"


def outcome(store: Path) -> dict[str, dict]:
    """method -> {run, accuracy: {set: top1}, loss: {step: loss}} of a finished demo store."""
    from cloob.results.table import read_rows

    rows = read_rows(str(store / "results"), latest=True).to_pylist()
    out: dict[str, dict] = {}
    for r in rows:
        m = out.setdefault(r["method"], {"run": r["run_id"], "accuracy": {}, "step": r["step"]})
        if r["step"] >= m["step"]:
            m["accuracy"][r["dataset"]] = r["top1"]
    for m in out.values():
        lines = (store / "runs" / m["run"] / "metrics.jsonl").read_text().splitlines()
        m["loss"] = {rec["step"]: rec["loss"] for rec in map(json.loads, lines) if "loss" in rec}
    return out


def compare(a: dict, b: dict, label_a: str, label_b: str, steps: int) -> str:
    marks = [s for s in CHECKPOINTS if s <= steps]
    head = ["method", "set", f"top-1 {label_a}", f"top-1 {label_b}", "difference (points)",
            *(f"loss gap @{s}" for s in marks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in sorted(a):
        gaps = []
        for s in marks:
            la, lb = a[method]["loss"].get(s), b[method]["loss"].get(s)
            gaps.append("-" if la is None or lb is None else f"{abs(la - lb) / max(abs(la), 1e-12):.1e}")
        for i, ds in enumerate(sorted(a[method]["accuracy"])):
            x, y = a[method]["accuracy"][ds], b[method]["accuracy"].get(ds)
            lines.append("| " + " | ".join([method if i == 0 else "", ds, f"{100 * x:.1f}", f"{100 * y:.1f}",
                                            f"{100 * abs(x - y):.1f}", *(gaps if i == 0 else [""] * len(gaps))]) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="a folder for the two demo stores")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()
    from flows.demo import DEFAULT_STEPS

    steps = args.steps or DEFAULT_STEPS
    native = native_capability()
    other = "avx2" if native.upper() != "AVX2" else "default"
    times = {}
    for label, cap in ((native, None), (other.upper(), other)):
        times[label] = run_demo(args.out / label.lower(), cap, steps)
        print(f"demo with {label} kernels: {times[label]:.0f} s", flush=True)
    table = compare(outcome(args.out / native.lower()), outcome(args.out / other), native, other.upper(), steps)
    print(table)
    if args.write:
        from bench.report import write_section

        cpu = platform.processor() or platform.machine()
        heading = HEADING.format(setting=setting(steps))
        text = (f"{heading}\n\n`python bench/bench_demo_arithmetic.py --out /tmp/arith --steps {steps} --write`, "
                f"{datetime.date.today()}, {os.cpu_count()} cores ({cpu}, native ATen kernels {native}); the demo "
                f"with {native} kernels against the same demo with ATEN_CPU_CAPABILITY={other} "
                f"({', '.join(f'{k}: {v:.0f} s' for k, v in times.items())}). Loss gap: |L_a - L_b| / |L_a| "
                f"at that step.\n\n{table}\n")
        write_section(heading, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
