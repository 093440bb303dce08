"""The GPU check: one command for a lent GPU machine (an H200; at most 8 minutes), with a CPU dry path.

Run it as `bench/gpu_check --device cuda` (the shell entry point installs the carried wheels from
.whl/, see bench/gpu_wheels.sh, and sets PYTHONPATH); `bench/gpu_check --device cpu` is the dry path:
every part at tiny sizes, in a few minutes, on any machine. Parts, each a subprocess with its own
time budget (killed with its process group when over it, so one hang cannot eat the whole check):

  preflight  torch, CUDA, and every module the parts import (a missing wheel is named at once)
  tests      `pytest -m cuda` on the test files that hold CUDA-marked tests
  loss       bench/bench_loss_paths.py sizes, one process: forward + backward at N = 4,096 / 16,384 /
             65,536 (dry: 256 / 512), d = 1024 (RN50's embedding width, the reference run's model:
             the N x N x d products then weigh as they do in its training), fp32 (TF32 off), TF32 and bf16
             features, for today's full path, the blocked path and the reference formulation: time
             (CUDA events; median of 3 after a warm-up, 1 call at 65,536), peak memory
             (max_memory_allocated), OOM as OOM, agreement with the fp32 full path
  train      bench/bench_train.py: RN50 in bf16 (ours: cloob_rn50_cc3m with cosine/20 warmup steps;
             open_clip_train.main --precision amp_bf16) on the same synthetic shards, samples/s after
             20 warm-up steps (dry: the tiny model, fp32, a few steps)
  eval       bench/bench_eval.py: zero-shot evaluation images/s, ours against the plain loop (RN50;
             dry: the tiny model)
  loader     bench/bench_loader.py: our ShardStream + DataLoader, samples/s by number of workers and
             per worker (RN50's 224 px train transform on 256 px JPEGs; dry: tiny)
  decode     bench/bench_decode.py: JPEG decoding + RN50's crop + normalise on the GPU (torchvision's
             decode_jpeg on the device, nvJPEG, batches of 256) against PIL and decode_jpeg on one CPU
             thread: images/s, the host CPU it still takes, and the pixels against PIL's (dry: the CPU
             paths only)

Results: every part's figures as JSON in the work folder, merged into one BENCHMARKS.md section,
"## GPU check" (or "## GPU check: CPU dry path ...", so that neither overwrites the other), with the
machine, GPU, date, command and load average. Where $OUT is set (the device tool's output folder)
or --out is given, gpu_check.md (the section), gpu_check.json (all figures) and gpu_check.log (all
parts' output) are copied there; `python bench/gpu_check.py --render gpu_check.json` writes the
section from a saved gpu_check.json into this checkout's BENCHMARKS.md.

Usage: bench/gpu_check [--device cuda|cpu] [--parts preflight,tests,loss,train,decode,eval,loader]
                       [--budget 470] [--out DIR] [--no-write] [--render PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from report import write_section  # noqa: E402

SECTION = {"cuda": "## GPU check",
           "cpu": "## GPU check: CPU dry path (`--device cpu`: tiny sizes, the code paths only, not GPU figures)"}
PARTS = ("preflight", "tests", "loss", "train", "decode", "eval", "loader")
# Seconds per part on the GPU; the whole check stops starting parts at --budget.
BUDGET = {"cuda": {"preflight": 60, "tests": 75, "loss": 120, "train": 170, "eval": 60, "loader": 60, "decode": 45},
          "cpu": {"preflight": 60, "tests": 90, "loss": 90, "train": 150, "eval": 90, "loader": 60, "decode": 60}}
SIZES = {
    "cuda": dict(loss_sizes="4096,16384,65536", dim=1024, train=dict(recipe="cloob_rn50_cc3m", arch="RN50", precision="bf16",
                 steps=60, warmup=20, batch=256, workers=8, log_every=10), image_size=256, samples=4096,
                 eval=dict(arch="RN50", spec="gtsrb", per_class=20, image_size=256, batch=128, workers=8, repeats=2),
                 loader=dict(arch="RN50", batch=256, workers="1,4,12"), decode=dict(images=1024, batch=256)),
    "cpu": dict(loss_sizes="256,512", dim=64, train=dict(recipe="tiny", arch="cloob-tiny-vit", precision="fp32", steps=10,
                warmup=10, batch=16, workers=1, log_every=5), image_size=64, samples=1024,
                eval=dict(arch="cloob-tiny-vit", spec="shapes", per_class=8, image_size=64, batch=32, workers=1, repeats=1),
                loader=dict(arch="cloob-tiny-vit", batch=32, workers="1,2"), decode=dict(images=48, batch=16)),
}
PREFLIGHT = r"""
import importlib, json, os, sys, time
t0 = time.time()
out = {"python": sys.version.split()[0], "executable": sys.executable}
missing = {}
for m in ["torch", "torchvision", "numpy", "PIL", "yaml", "pydantic", "fsspec", "psutil", "tqdm", "pyarrow", "pandas",
          "webdataset", "braceexpand", "ftfy", "regex", "open_clip", "open_clip_train.main", "pytest",
          "cloob.losses", "cloob.train.loop", "cloob.evaluate.runner", "cloob.data.stream", "cloob.data.synthetic",
          "cloob.run.launch"]:
    try:
        mod = importlib.import_module(m)
        out.setdefault("modules", {})[m] = getattr(mod, "__version__", "") or os.path.dirname(getattr(mod, "__file__", "") or "")
    except Exception as e:
        missing[m] = f"{type(e).__name__}: {e}"
out["missing"] = missing
import torch
out["torch"] = torch.__version__
out["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
               capability=f"{p.major}.{p.minor}", gpus=torch.cuda.device_count())
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a @ a
    s.record()
    for _ in range(20):
        a @ a
    e.record()
    torch.cuda.synchronize()
    out["bf16_tflops_4096"] = round(20 * 2 * 4096**3 / (s.elapsed_time(e) / 1e3) / 1e12, 1)
out["seconds"] = round(time.time() - t0, 1)
print("PREFLIGHT " + json.dumps(out))
"""


def _now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _cpu() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 2**20
        return f"{m[1].strip() if m else 'unknown CPU'}, {os.cpu_count()} logical cores, {mem:.0f} GiB RAM"
    except (OSError, TypeError):
        return f"{os.cpu_count()} logical cores"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def commands(device: str, work: Path) -> dict[str, list[str]]:
    """Each part's command line (run from the repository root, the environment's PYTHONPATH kept)."""
    py, s = sys.executable, SIZES[device]
    tr, ev, ld = s["train"], s["eval"], s["loader"]
    shards = work / "shards"
    cuda_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                        if "mark.cuda" in p.read_text(errors="replace"))
    return {
        "preflight": [py, "-c", PREFLIGHT],
        "tests": [py, "-m", "pytest", "-m", "cuda", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rA",
                  f"--basetemp={work / 'pytest'}", *cuda_files],
        "loss": [py, "bench/bench_loss_paths.py", "sizes", "--device", device, "--sizes", s["loss_sizes"],
                 "--dim", str(s["dim"]), "--precisions", "fp32,tf32,bf16", "--one-process", "--warmup-at-n",
                 "--repeats", "3", "--json", str(work / "loss.json")],
        "train": [py, "bench/bench_train.py", "--recipe", tr["recipe"], "--arch", tr["arch"], "--precision", tr["precision"],
                  "--device", device, "--steps", str(tr["steps"]), "--warmup", str(tr["warmup"]),
                  "--batch-size", str(tr["batch"]), "--workers", str(tr["workers"]), "--log-every", str(tr["log_every"]),
                  "--repeats", "1", "--methods", "clip,cloob", "--data", str(shards), "--samples", str(s["samples"]),
                  "--image-size", str(s["image_size"]), "--json", str(work / "train.json")],
        "eval": [py, "bench/bench_eval.py", "--arch", ev["arch"], "--spec", ev["spec"], "--per-class", str(ev["per_class"]),
                 "--image-size", str(ev["image_size"]), "--batch-size", str(ev["batch"]), "--workers", str(ev["workers"]),
                 "--repeats", str(ev["repeats"]), "--device", device, "--json", str(work / "eval.json")],
        "loader": [py, "bench/bench_loader.py", "--arch", ld["arch"], "--batch-size", str(ld["batch"]),
                   "--workers", ld["workers"], "--data", str(shards), "--samples", str(s["samples"]),
                   "--image-size", str(s["image_size"]), "--json", str(work / "loader.json")],
        "decode": [py, "bench/bench_decode.py", "--device", device, "--images", str(s["decode"]["images"]),
                   "--batch", str(s["decode"]["batch"]), "--json", str(work / "decode.json")],
    }


def run_part(name: str, cmd: list[str], timeout: float, log_path: Path) -> dict:
    """Run one part in its own process group; kill the group past `timeout` seconds."""
    shown = [*cmd[:2], "<preflight script>"] if name == "preflight" else cmd
    print(f"== {name} (budget {timeout:.0f} s): {shlex.join(shown)}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)

        def pump():  # the part's output, line by line, to its log and to our console
            for line in proc.stdout:
                log.write(line)
                log.flush()
                print(f"   {name}| {line.rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:  # the whole group: on time-out, and stragglers (DataLoader workers, a fork server) in any case
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        rc = proc.wait()
        reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    status = "timed out" if timed_out else ("ok" if rc == 0 else f"failed (exit {rc})")
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "rc": rc, "seconds": round(seconds, 1), "budget_s": round(timeout),
            "tail": log_path.read_text(errors="replace").splitlines()[-25:]}


def collect(name: str, part: dict, work: Path) -> None:
    """The part's figures: its JSON file, or what its log says."""
    log = (work / f"{name}.log").read_text(errors="replace")
    if name == "preflight":
        m = re.search(r"^PREFLIGHT (.+)$", log, re.M)
        part["info"] = json.loads(m[1]) if m else {}
    elif name == "tests":
        summary = [ln.strip("= ") for ln in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
        part["summary"] = summary[-1] if summary else ""
        part["outcomes"] = [ln for ln in log.splitlines() if re.match(r"^(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) ", ln)]
        if part["rc"] == 5:
            part["status"] = "ok (no CUDA-marked test collected)"
    elif (work / f"{name}.json").exists():
        part["figures"] = json.loads((work / f"{name}.json").read_text())
    elif name == "loss" and (work / "loss.json.jsonl").exists():  # killed mid-way: the measurements so far
        recs = [json.loads(ln) for ln in (work / "loss.json.jsonl").read_text().splitlines() if ln.strip()]
        part["figures"] = {"records": recs, "partial": True}


# --------------------------------------------------------------------------------------------------
# The section
# --------------------------------------------------------------------------------------------------


def _loss_text(fig: dict) -> str:
    from bench_loss_paths import OOM, _summarise_sizes

    rows = fig.get("rows")
    if rows is None:
        recs = fig.get("records", [])
        sizes = sorted({r["n"] for r in recs})
        rows = _summarise_sizes(recs, sizes, ["full", "blocked", "reference"], ["fp32", "tf32", "bf16"])
    lines = ["| N | d | precision | implementation | block rows | ms (median) | calls | peak MiB | ms / full's | "
             "ref ms / this | peak / full's | rel diff vs fp32 full: loss / x-grad |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def find(n, impl, prec):
        return next((r for r in rows if r["n"] == n and r["impl"] == impl and r["precision"] == prec), None)

    for r in rows:
        full, ref = find(r["n"], "full", r["precision"]), find(r["n"], "reference", r["precision"])
        if r["status"] != "ok":
            lines.append(f"| {r['n']:,} | {r['dim']} | {r['precision']} | {r['impl']} | {r['block'] or '-'} | {OOM} | - | "
                         f"{OOM} | - | - | - | - |")
            continue
        ok = full is not None and full["status"] == "ok"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}"
        vs_full = f"{r['time_s'] / full['time_s']:.2f}" if ok else "n/a"
        if ref is not None and ref["status"] == "ok":
            vs_ref = f"{ref['time_s'] / r['time_s']:.2f}"
        else:
            vs_ref = "ref OOM" if ref else "n/a"
        mem = f"{r['peak_bytes'] / full['peak_bytes']:.2f}" if ok and r["peak_bytes"] and full["peak_bytes"] else "n/a"
        agree = f"{r['loss_rel_diff']:.1e} / {r['grad_rel_diff']:.1e}" if "loss_rel_diff" in r else "-"
        lines.append(f"| {r['n']:,} | {r['dim']} | {r['precision']} | {r['impl']} | {r['block'] or '-'} | "
                     f"{r['time_s'] * 1e3:,.1f} | {len(r['times'])} | {peak} | {vs_full} | {vs_ref} | {mem} | {agree} |")
    note = " (partial: the part was stopped; the measurements made until then)" if fig.get("partial") else ""
    return "\n".join(lines) + note


def _train_text(fig: dict) -> str:
    text = fig.get("table") or ""
    runs = fig.get("runs", [])
    if not text and runs:  # stopped before the table: the runs that finished
        text = "\n".join(f"- {r['impl']}-{r['method']}: " + (r["error"] or f"{r['samples_per_s']:.1f} samples/s") for r in runs)
    cmds = "\n".join(r["cmd"] for r in runs if r.get("cmd"))
    return (f"{fig.get('arch')} ({fig.get('precision')}, {fig.get('device')}), batch {fig.get('batch_size')}, "
            f"{fig.get('workers')} DataLoader workers, {fig.get('warmup')} warm-up steps then {fig.get('steps')} measured, "
            f"one run each.\n\n{text}\n\n```\n{cmds}\n```")


def section(results: dict) -> str:
    dev = results["device"]
    info = results["parts"].get("preflight", {}).get("info", {})
    gpu = (f"{info.get('gpu')} ({info.get('gpu_memory_gib')} GiB, compute capability {info.get('capability')}, "
           f"CUDA {info.get('cuda')}; nvidia-smi: {results.get('nvidia_smi') or '-'}; a 4096^3 bf16 product: "
           f"{info.get('bf16_tflops_4096')} TFLOP/s)") if info.get("gpu") else "none"
    lines = [SECTION[dev], ""]
    if dev == "cpu":
        lines += ["The CPU dry path of `bench/gpu_check`: every part of the GPU check at tiny sizes, to show that the "
                  "code paths, the wheels and the merging of figures work. These are not GPU figures and say little "
                  "about speed.", ""]
    lines += [f"- Machine: {results['cpu']}; GPU: {gpu}",
              f"- Python {info.get('python', '?')} (`{info.get('executable', '?')}`), torch {info.get('torch', '?')}; "
              f"modules from: {', '.join(sorted({v for v in info.get('modules', {}).values() if v.startswith('/')})) or '?'}",
              f"- Date: {results['date']}",
              f"- Command: `{results['command']}` ({results['total_s']:.0f} s in all, budget {results['budget_s']} s)",
              f"- Load average (1/5/15 min) at start: {results['load_start']}; at end: {results['load_end']}", "",
              "| part | status | seconds | budget s |", "|---|---|---:|---:|"]
    for name, p in results["parts"].items():
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', 0):.0f} | {p.get('budget_s', '-')} |")
    missing = info.get("missing") or {}
    if missing:
        lines += ["", "Modules that did not import: " + "; ".join(f"`{k}` ({v[:120]})" for k, v in missing.items())]
    parts = results["parts"]
    if "tests" in parts:
        t = parts["tests"]
        lines += ["", "### CUDA-marked tests", "", f"`pytest -m cuda`: {t.get('summary') or t['status']}", ""]
        lines += [f"- {o}" for o in t.get("outcomes", [])]
    if "loss" in parts:
        fig = parts["loss"].get("figures")
        lines += ["", "### Loss forward + backward (CLOOB, beta 8, inv_tau 30)", ""]
        if fig:
            how = ("CUDA events, median of 3 after one warm-up call (one call at N = 65,536); peak: "
                   "max_memory_allocated minus the inputs" if dev == "cuda" else
                   "perf_counter, median of 3 after one warm-up call; peak memory is not measured in one CPU process "
                   "(bench/bench_loss_paths.py sizes measures it, one process per call)")
            lines += ["full: today's path (cloob.losses.contrastive_loss), blocked: cloob.losses.rows_loss with the "
                      "auto block rows, reference: bench/reference_cloob.py. fp32: TF32 off; tf32: TF32 matmuls (no "
                      "effect on CPU); bf16: bf16 features (ours computes in float32 inside, the reference runs under "
                      f"bf16 autocast). Time: {how}. Rel diff against the fp32 full path at the same N.", "", _loss_text(fig)]
        else:
            lines += [f"no figures ({parts['loss']['status']})"]
    if "train" in parts:
        fig = parts["train"].get("figures")
        lines += ["", "### Training throughput: ours vs open_clip_train.main, same shards", ""]
        lines += [_train_text(fig) if fig else f"no figures ({parts['train']['status']})"]
    if "eval" in parts:
        fig = parts["eval"].get("figures")
        lines += ["", "### Zero-shot evaluation images/s (bench/bench_eval.py)", ""]
        lines += [(f"{fig['arch']}, {fig['n_images']} generated {fig['image_size']} px JPEGs ({fig['spec']}'s classes), "
                   f"batch {fig['batch_size']}, {fig['workers']} workers, median of {fig['repeats']}.\n\n{fig['table']}")
                  if fig else f"no figures ({parts['eval']['status']})"]
    if "loader" in parts:
        fig = parts["loader"].get("figures")
        lines += ["", "### DataLoader samples/s per core (bench/bench_loader.py)", ""]
        if fig and not fig.get("table"):  # stopped part-way: the k measured so far
            fig["table"] = "\n".join(["| workers | samples/s | samples/s per worker |", "|---:|---:|---:|"] + [
                f"| {r['workers']} | {r['samples_per_s']:,.0f} | {r['per_worker']:,.0f} |" for r in fig.get("rows", [])])
        lines += [(f"{fig['arch']} train transform, {fig['image_size']} px JPEGs, batch {fig['batch_size']}.\n\n{fig['table']}")
                  if fig else f"no figures ({parts['loader']['status']})"]
    if "decode" in parts:
        fig = parts["decode"].get("figures")
        lines += ["", "### JPEG decoding + RN50's crop: PIL, decode_jpeg on the CPU and on the GPU (bench/bench_decode.py)", ""]
        lines += [(f"{fig['images']} photo-like JPEGs, shorter side {fig['size']} px, {fig['kb_mean']:.1f} KB on average, "
                   f"the same crop box per picture in every path.\n\n{fig['table']}") if fig
                  else f"no figures ({parts['decode']['status']})"]
    failed = {k: p for k, p in parts.items() if not p["status"].startswith(("ok", "skipped"))}
    for name, p in failed.items():
        lines += ["", f"{name} {p['status']}; the end of its output:", "", "```", *p.get("tail", [])[-12:], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 470 on cuda)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="copy the section, figures and log here ($OUT)")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    ap.add_argument("--render", default="", help="write the section of a saved gpu_check.json into BENCHMARKS.md")
    args = ap.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text())
        write_section(SECTION[results["device"]], section(results))
        print(f"wrote '{SECTION[results['device']]}'")
        return 0

    budget = args.budget or (470.0 if args.device == "cuda" else 290.0)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    cmds = commands(args.device, work)
    t_start = time.perf_counter()
    results = {"device": args.device, "cpu": _cpu(), "date": _now(), "load_start": _load(), "budget_s": round(budget),
               "command": shlex.join(["bench/gpu_check", *sys.argv[1:]]), "nvidia_smi": _driver(), "parts": {}}
    print(f"# gpu check, {args.device}, work folder {work}, budget {budget:.0f} s; {results['cpu']}; "
          f"{results['nvidia_smi']}", flush=True)
    for name in [p for p in PARTS if p in args.parts.split(",")]:
        left = budget - (time.perf_counter() - t_start)
        if left < 15:
            results["parts"][name] = {"status": "skipped (out of time)", "seconds": 0, "budget_s": 0}
            continue
        part = run_part(name, cmds[name], min(BUDGET[args.device][name], left - 5), work / f"{name}.log")
        collect(name, part, work)
        results["parts"][name] = part
        if name == "preflight":
            info = part.get("info", {})
            if args.device == "cuda" and not info.get("cuda_available"):
                print("no CUDA device visible to torch: stopping (use --device cpu for the dry path)", flush=True)
                break
            if info.get("missing"):
                print(f"modules missing: {', '.join(info['missing'])} (carry their wheels: bench/gpu_wheels.sh)", flush=True)
    results.update(total_s=time.perf_counter() - t_start, load_end=_load())
    (work / "gpu_check.json").write_text(json.dumps(results, indent=1))
    text = section(results)
    (work / "gpu_check.md").write_text(text)
    with open(work / "gpu_check.log", "w") as log:
        for name in results["parts"]:
            if (work / f"{name}.log").exists():
                log.write(f"===== {name}\n" + (work / f"{name}.log").read_text(errors="replace"))
    print("\n" + text, flush=True)
    if not args.no_write:
        write_section(SECTION[args.device], text)
        print(f"wrote '{SECTION[args.device]}' in BENCHMARKS.md", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for f in ("gpu_check.json", "gpu_check.md", "gpu_check.log"):
            shutil.copy(work / f, Path(args.out) / f)
        print(f"copied gpu_check.json, .md and .log to {args.out}", flush=True)
    return 0 if all(p["status"].startswith("ok") for p in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
