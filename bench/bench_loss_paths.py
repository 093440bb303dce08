"""The loss paths against each other: the blocked row-wise loss against today's full path and the
reference formulation (memory and time by N), and the sharded DDP loss against the replicated one on
real gloo ranks (time per rank by W).

    full:      cloob.losses.contrastive_loss (one process, shared Gram matrices, ~7 N x N buffers)
    blocked:   cloob.losses.rows_loss(..., block=b), b rows at a time, scores recomputed in backward;
               b = cloob.losses.plan.auto_block_rows(N, N, device) unless --block is given
    reference: bench/reference_cloob.py (four independent retrievals, eye mask, plain autograd)
All three: CLOOB (infoloob + hopfield), beta 8, inv_tau 30 (fixed), L2-normalised (N, d) inputs with
requires_grad, one forward + backward per timed call.

`sizes` (memory and time by N). On CPU every measurement is a fresh subprocess that makes its
inputs, runs one forward + backward and reports its time and the growth of its peak resident set
(ru_maxrss) from right after the inputs were made (and a tiny N = 64 call had started the thread
pools), as bench/bench_loss.py does; the process caps its address space at its size plus the
available memory less a reserve (--reserve-gib, default 3: other sessions share this machine), so a
run that cannot fit raises an allocation error, reported as OOM, instead of waking the kernel's OOM
killer. R rounds per N, the implementations' order alternating by round; time = median of the R
processes, memory = the largest growth seen. The blocked loss value and x-gradient must equal the
full path's to rel 1e-5 (both from round 0, same seeded inputs) wherever both ran; the reference's
are checked to rel 1e-4 / 1e-3 (bench_loss.py's tolerances). With --device cuda (or --one-process)
one process runs everything, in each --precisions: fp32 (TF32 off), tf32 (TF32 matmuls), bf16
(bf16 input features: ours computes in float32 inside, the reference runs under bf16 autocast);
memory there is torch.cuda.max_memory_allocated() minus what was allocated after the inputs, and
each result is compared with the fp32 full path's (else blocked's) at the same N. OOM shows as OOM.

`ranks` (time per rank by W). W real processes (a fork server's) in a gloo group joined by a file
store, one torch thread each; rank r holds its own B = N / W rows of the global batch (requires_grad)
and times forward + backward of cloob.train.global_loss.GlobalLoss, sharded and replicated
alternating round by round, every call between two barriers: wall time (time.perf_counter) and CPU
time (time.process_time) per rank. After one small warm-up call per mode, R rounds; per mode the
median over rounds of the slowest rank's time (the step waits for it) and of the mean over ranks.
Both modes are unblocked (loss.blocked=false). The sharded loss value must equal the replicated one
(rel 1e-5) and so must each rank's x-gradient. W ranks on fewer cores are oversubscribed: both modes
equally, the wall time of each then counts the waiting too.

Usage: python bench/bench_loss_paths.py sizes [--sizes 8192,16384,32768] [--dim 256] [--repeats R]
                                              [--block B] [--device cpu|cuda] [--precisions fp32,tf32,bf16]
                                              [--impls full,blocked,reference] [--json PATH] [--write]
       python bench/bench_loss_paths.py ranks [--n 8192] [--dim 512] [--worlds 1,2,4] [--repeats R]
                                              [--json PATH] [--write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_loss import _command, _is_oom, _machine, _proc_kib
from report import write_section

ROOT = Path(__file__).resolve().parents[1]
OOM = "OOM"
IMPLS = ("full", "blocked", "reference")
BETA, INV_TAU = 8.0, 30.0
TOL_BLOCKED = 1e-5
TOL_REF = (1e-4, 1e-3)  # loss, x-gradient (as bench/bench_loss.py)
GOAL_MEMORY_RATIO, GOAL_TIME_RATIO, GOAL_PEAK_GIB = 10.0, 1.5, 2.0
GOAL_SHARDED = 1.3  # sharded per-rank time at most 1.3 / W of the replicated


def _now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _cap_address_space(reserve_gib: float) -> None:
    try:
        avail = _proc_kib("/proc/meminfo", "MemAvailable") * 1024
        limit = _proc_kib("/proc/self/status", "VmSize") * 1024 + avail - int(reserve_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    except (OSError, KeyError, ValueError):
        pass


# --------------------------------------------------------------------------------------------------
# sizes: the child (one measurement on CPU, or everything in one process)
# --------------------------------------------------------------------------------------------------


def _sizes_child(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.reference_cloob import cloob_reference
    from cloob.losses import contrastive_loss, rows_loss
    from cloob.losses.plan import auto_block_rows

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    out = open(args.results, "a")

    def block_for(n: int) -> int:
        if args.block:
            return args.block
        if "device_type" in inspect.signature(auto_block_rows).parameters:  # per-device block bytes
            return auto_block_rows(n, n, device_type=dev.type)
        return auto_block_rows(n, n)

    def run(impl: str, x, y, t, precision: str):
        if impl == "full":
            return contrastive_loss(x, y, t, objective="infoloob", retrieval="hopfield", beta=BETA)
        if impl == "blocked":
            return rows_loss(x, y, t, objective="infoloob", retrieval="hopfield", beta=BETA, block=block_for(x.shape[0]))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return cloob_reference(x, y, t, BETA)

    def set_precision(precision: str) -> None:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"

    def inputs(n: int, precision: str):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, args.dim, generator=g)
        y = x + torch.randn(n, args.dim, generator=g)  # correlated pairs, as a trained model's
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        x = torch.nn.functional.normalize(x, dim=-1).to(dev, dtype).requires_grad_(True)
        y = torch.nn.functional.normalize(y, dim=-1).to(dev, dtype).requires_grad_(True)
        return x, y, torch.tensor(INV_TAU, device=dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def once(impl, x, y, t, precision) -> tuple[float, float]:
        x.grad = y.grad = None
        sync()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = run(impl, x, y, t, precision)
        loss.backward()
        if cuda:
            end.record()
            sync()
            return start.elapsed_time(end) / 1e3, float(loss.detach())
        return time.perf_counter() - t0, float(loss.detach())

    def free():
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    impls, sizes, precisions = args.impls.split(","), [int(s) for s in args.sizes.split(",")], args.precisions.split(",")
    for precision in precisions:  # thread pools, kernels, the CUDA context: before any baseline
        set_precision(precision)
        xs, ys, ts = inputs(64, precision)
        for impl in impls:
            once(impl, xs, ys, ts, precision)
    del xs, ys, ts
    free()
    if not cuda:
        _cap_address_space(args.reserve_gib)
    first = len(sizes) * len(precisions) * len(impls) == 1  # CPU: ru_maxrss tells one measurement's peak only
    for n in sizes:
        baseline = None  # (loss, x-grad) of fp32 full, else fp32 blocked, at this N
        for precision in precisions:
            set_precision(precision)
            x, y, t = inputs(n, precision)
            for impl in impls:
                rec = {"impl": impl, "n": n, "dim": args.dim, "precision": precision, "device": str(dev),
                       "block": block_for(n) if impl == "blocked" else None, "times": []}
                print(f"    {impl} N={n} {precision} ...", file=sys.stderr, flush=True)
                if cuda:
                    free()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                    rec["rss_now_at_baseline"] = _proc_kib("/proc/self/status", "VmRSS") * 1024
                try:
                    reps = args.repeats if n <= args.big_n else 1
                    calls = reps + (1 if args.warmup_at_n and n <= args.big_n else 0)
                    for i in range(calls):
                        seconds, value = once(impl, x, y, t, precision)
                        if i == 0:
                            sync()
                            if cuda:
                                rec["peak_bytes"] = torch.cuda.max_memory_allocated() - base
                            elif first:
                                rec["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
                                rec["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                            rec["loss"] = value
                            grad = x.grad.detach().float()
                            if args.save_grad:
                                torch.save({"loss": value, "grad": grad.cpu()}, args.save_grad)
                            if precision == "fp32" and impl in ("full", "blocked") and baseline is None:
                                baseline = (value, grad.cpu() if not cuda else grad)
                                rec["agreement_with"] = "itself"
                            elif baseline is not None:
                                ref_grad = baseline[1].to(grad.device)
                                rec["loss_rel_diff"] = abs(value - baseline[0]) / max(abs(baseline[0]), 1e-30)
                                rec["grad_rel_diff"] = float((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))
                            del grad
                        if i >= calls - reps:
                            rec["times"].append(seconds)
                    rec["status"] = "ok"
                except (RuntimeError, MemoryError) as exc:
                    if not _is_oom(exc):
                        raise
                    rec.update(status=OOM, error=" ".join(str(exc).split())[:200])
                first = False
                x.grad = y.grad = None
                free()
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(f"    {impl} N={n} {precision}: {rec['status']} {rec['times']}", file=sys.stderr, flush=True)
            del x, y, t
            free()


def _spawn_sizes(args, results: Path, impls: str, sizes: str, repeats: int, save_grad: str = "") -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--impls", impls, "--sizes", sizes,
           "--dim", str(args.dim), "--device", args.device, "--precisions", args.precisions,
           "--repeats", str(repeats), "--block", str(args.block or 0), "--results", str(results),
           "--reserve-gib", str(args.reserve_gib), "--big-n", str(args.big_n)]
    if args.warmup_at_n:
        cmd.append("--warmup-at-n")
    if save_grad:
        cmd += ["--save-grad", save_grad]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 and proc.returncode not in (-9, 137):
        sys.stderr.write(proc.stderr[-3000:])
    return proc.returncode


def sizes_main(args) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    one = args.one_process or args.device == "cuda"
    sizes = [int(s) for s in args.sizes.split(",")]
    impls = args.impls.split(",")
    load_start = _load()
    print(f"# {_machine(args.device)}\n# load average at start: {load_start}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_loss_paths_"))
    results = work / "results.jsonl"
    recs: list[dict] = []
    if one:
        if args.json:  # the measurements as they are made, for a caller that may stop this run
            results = Path(args.json + ".jsonl")
            results.unlink(missing_ok=True)
        rc = _spawn_sizes(args, results, args.impls, args.sizes, args.repeats or 3)
        if results.exists():
            recs = [json.loads(ln) for ln in results.read_text().splitlines()]
        if rc != 0:
            print(f"child exited {rc} after {len(recs)} measurements", file=sys.stderr)
    else:
        for n in sizes:
            reps = args.repeats or (3 if n <= 16384 else 1)
            oom: set[str] = set()
            for r in range(reps):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    if impl in oom:
                        continue
                    one_rec = work / "one.jsonl"
                    one_rec.unlink(missing_ok=True)
                    rc = _spawn_sizes(args, one_rec, impl, str(n), 1, str(work / f"{impl}-{n}.pt") if r == 0 else "")
                    if rc in (-9, 137):
                        rec = {"impl": impl, "n": n, "precision": "fp32", "status": OOM, "error": "killed (SIGKILL)"}
                    elif rc != 0 or not one_rec.exists():
                        raise SystemExit(f"measurement {impl} N={n} failed ({rc})")
                    else:
                        rec = json.loads(one_rec.read_text().splitlines()[-1])
                    rec["round"], rec["load"] = r, _load()
                    recs.append(rec)
                    if rec["status"] == OOM:
                        oom.add(impl)
                    what = "" if rec["status"] == OOM else f"{rec['times'][0]:.2f} s, {_mib(rec.get('peak_bytes'))} MiB"
                    print(f"  N={n} round {r} {impl}: {rec['status']} {what} (load {_load()})", flush=True)
        _check_saved(work, sizes, recs)
    rows = _summarise_sizes(recs, sizes, impls, args.precisions.split(","))
    print("\n" + _sizes_table(rows))
    goals = _sizes_goals(rows) if not one else []
    for g in goals:
        print(f"goal: {g['goal']}: {g['measured']} -> {'met' if g['met'] else 'NOT met'}")
    bad = [r for r in rows if r.get("disagree")]
    saved = {"rows": rows, "records": recs, "goals": goals, "machine": _machine(args.device), "load_start": load_start,
             "load_end": _load(), "date": _now(), "command": _command(), "sizes": sizes, "impls": impls, "dim": args.dim,
             "precisions": args.precisions.split(","), "reserve_gib": args.reserve_gib, "one_process": one,
             "mem_total_gib": _proc_kib("/proc/meminfo", "MemTotal") / 2**20, "cores": os.cpu_count(), "note": args.note}
    if args.json:
        Path(args.json).write_text(json.dumps(saved, indent=1))
    if args.write:
        _write_sizes(saved)
    for r in bad:
        print(f"DISAGREE: {r['impl']} N={r['n']} {r['precision']}: {r['disagree']}", file=sys.stderr)
    return 1 if bad else 0


def _check_saved(work: Path, sizes: list[int], recs: list[dict]) -> None:
    """Blocked and reference against full from the round-0 files: value and x-gradient."""
    import torch

    for n in sizes:
        full = work / f"full-{n}.pt"
        ok = [r for r in recs if r["n"] == n and r["status"] == "ok"]
        if not full.exists() or not any(r["impl"] == "full" for r in ok):
            continue
        f = torch.load(full)
        for impl in ("blocked", "reference"):
            p = work / f"{impl}-{n}.pt"
            if not p.exists() or not any(r["impl"] == impl for r in ok):
                continue
            o = torch.load(p)
            loss_rel = abs(o["loss"] - f["loss"]) / max(abs(f["loss"]), 1e-30)
            grad_rel = float((o["grad"] - f["grad"]).norm() / f["grad"].norm().clamp_min(1e-30))
            for r in recs:
                if r["n"] == n and r["impl"] == impl and r.get("round") == 0:
                    r.update(loss_rel_diff=loss_rel, grad_rel_diff=grad_rel)
            print(f"  N={n} {impl} vs full: loss rel diff {loss_rel:.1e}, x-grad rel diff {grad_rel:.1e}", flush=True)


def _summarise_sizes(recs, sizes, impls, precisions) -> list[dict]:
    rows = []
    for n in sizes:
        for precision in precisions:
            for impl in impls:
                rs = [r for r in recs if r["n"] == n and r["impl"] == impl and r.get("precision", "fp32") == precision]
                if not rs:
                    continue
                ok = [r for r in rs if r["status"] == "ok"]
                times = [t for r in ok for t in r["times"]]
                peaks = [r["peak_bytes"] for r in ok if r.get("peak_bytes") is not None]
                row = {"n": n, "dim": rs[0].get("dim"), "impl": impl, "precision": precision, "block": rs[0].get("block"),
                       "status": "ok" if ok else OOM, "error": rs[0].get("error", ""),
                       "time_s": statistics.median(times) if times else None, "times": times,
                       "peak_bytes": max(peaks) if peaks else None,
                       "peak_rss_bytes": max((r["peak_rss_bytes"] for r in ok if r.get("peak_rss_bytes")), default=None),
                       "loss": ok[0]["loss"] if ok else None}
                agree = [r for r in ok if "loss_rel_diff" in r]
                if agree:
                    row["loss_rel_diff"], row["grad_rel_diff"] = agree[0]["loss_rel_diff"], agree[0]["grad_rel_diff"]
                    if precision == "fp32":
                        tol = (TOL_BLOCKED, TOL_BLOCKED) if impl == "blocked" else TOL_REF
                        if row["loss_rel_diff"] > tol[0] or row["grad_rel_diff"] > tol[1]:
                            row["disagree"] = f"loss {row['loss_rel_diff']:.1e}, x-grad {row['grad_rel_diff']:.1e} (tol {tol})"
                rows.append(row)
    return rows


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _row(rows, n, impl, precision="fp32"):
    return next((r for r in rows if r["n"] == n and r["impl"] == impl and r["precision"] == precision), None)


def _sizes_table(rows) -> str:
    lines = ["| N | d | precision | implementation | block rows | time s (median) | runs | min s | peak MiB | "
             "time / full | full peak / peak | loss | rel diff vs full (loss / x-grad) |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        full = _row(rows, r["n"], "full", r["precision"])
        if r["status"] != "ok":
            lines.append(f"| {r['n']:,} | {r['dim']} | {r['precision']} | {r['impl']} | {r['block'] or '-'} | {OOM} | "
                         f"- | - | {OOM} | - | - | - | - |")
            continue
        ok_full = full and full["status"] == "ok"
        t_ratio = f"{r['time_s'] / full['time_s']:.2f}" if ok_full and full["time_s"] else "n/a"
        m_ratio = f"{full['peak_bytes'] / r['peak_bytes']:.1f}" if ok_full and full["peak_bytes"] and r["peak_bytes"] else \
            ("n/a (full: OOM)" if full and not ok_full else "n/a")
        agree = "-" if "loss_rel_diff" not in r else f"{r['loss_rel_diff']:.1e} / {r['grad_rel_diff']:.1e}"
        lines.append(f"| {r['n']:,} | {r['dim']} | {r['precision']} | {r['impl']} | {r['block'] or '-'} | {r['time_s']:,.3f} | "
                     f"{len(r['times'])} | {min(r['times']):,.3f} | {_mib(r['peak_bytes'])} | {t_ratio} | {m_ratio} | "
                     f"{r['loss']:.6f} | {agree} |")
    return "\n".join(lines)


def _sizes_goals(rows) -> list[dict]:
    goals = []
    full, blk = _row(rows, 16384, "full"), _row(rows, 16384, "blocked")
    if full and blk and full["status"] == blk["status"] == "ok":
        mem = full["peak_bytes"] / blk["peak_bytes"]
        tim = blk["time_s"] / full["time_s"]
        goals.append({"goal": f"N = 16,384: blocked peak memory at least {GOAL_MEMORY_RATIO:g}x below the full path's",
                      "measured": f"{mem:.1f}x ({_mib(blk['peak_bytes'])} vs {_mib(full['peak_bytes'])} MiB)",
                      "met": mem >= GOAL_MEMORY_RATIO})
        fastest = min(blk["times"]) / min(full["times"])
        goals.append({"goal": f"N = 16,384: blocked time at most {GOAL_TIME_RATIO:g}x the full path's",
                      "measured": f"{tim:.2f}x ({blk['time_s']:.1f} vs {full['time_s']:.1f} s, medians; fastest runs: "
                                  f"{fastest:.2f}x, {min(blk['times']):.1f} vs {min(full['times']):.1f} s)",
                      "met": tim <= GOAL_TIME_RATIO})
    big = _row(rows, 32768, "blocked")
    if big:
        peak = max(big["peak_bytes"] or 0, big["peak_rss_bytes"] or 0) if big["status"] == "ok" else None
        goals.append({"goal": f"N = 32,768: blocked forward + backward in one process under {GOAL_PEAK_GIB:g} GiB peak",
                      "measured": OOM if peak is None else
                      f"growth {_mib(big['peak_bytes'])} MiB; whole process peak RSS {_mib(big['peak_rss_bytes'])} MiB"
                      f" ({big['time_s']:.0f} s); full: {(_row(rows, 32768, 'full') or {}).get('status', 'not run')}, "
                      f"reference: {(_row(rows, 32768, 'reference') or {}).get('status', 'not run')}",
                      "met": peak is not None and peak < GOAL_PEAK_GIB * 2**30})
    return goals


def _write_sizes(saved: dict) -> None:
    """The section, from what sizes_main saved (also re-rendered from its --json file by --from-json)."""
    rows, goals = saved["rows"], saved["goals"]
    sizes = " / ".join(f"{int(s):,}" for s in saved["sizes"])
    heading = f"## Peak memory and time of the blocked path at N = {sizes} against today's path and the reference formulation"
    reps = {r["n"]: len(r["times"]) for r in rows if r["impl"] == "blocked"}
    goal_lines = "\n".join(f"- {g['goal']}: {g['measured']}: **{'met' if g['met'] else 'not met'}**" for g in goals)
    loads = [r["load"] for r in saved["records"] if r.get("load")]
    load_range = ""
    if loads:
        one_min = [float(v.split()[0]) for v in loads]
        load_range = f"; 1-min load after each run: {min(one_min):.2f} to {max(one_min):.2f}"
    text = (
        f"{heading}\n\n"
        f"- Machine: {saved['machine']}\n- Date: {saved['date']}\n- Command: `{saved['command']}`\n"
        f"- Load average (1/5/15 min) at start: {saved['load_start']}; at end: {saved['load_end']}{load_range} (other "
        f"sessions share the machine's {saved['cores']} cores: its 2 threads compete with their tests)\n\n"
        f"{_sizes_table(rows)}\n\n"
        f"CLOOB (infoloob + hopfield), d = {saved['dim']}, beta {BETA:g}, inv_tau {INV_TAU:g}, float32, one forward + "
        f"backward per call. full = `cloob.losses.contrastive_loss` (today's path), blocked = `cloob.losses.rows_loss(..., "
        f"block=b)` with b from `auto_block_rows` (8 MiB of scores per block on CPU), reference = "
        f"`bench/reference_cloob.py`. Each call is a fresh process; memory is the growth of its peak RSS "
        f"(`ru_maxrss`) from after the inputs were made, the largest over the runs; time is the median over "
        f"the runs (runs per N: {', '.join(f'{n:,}: {k}' for n, k in reps.items())}; a single run at the largest N, "
        f"where one takes minutes), implementations alternating by round. OOM: the allocation failed under the "
        f"process's address-space cap (its size + available memory - {saved['reserve_gib']:g} GiB), i.e. it does not "
        f"fit in this machine's {saved['mem_total_gib']:.0f} GiB. Min s: the fastest run, the least disturbed by the "
        f"other sessions' load. Rel diff: value and x-gradient "
        f"against the full path in the same round (blocked must agree to {TOL_BLOCKED:g}, the reference to "
        f"{TOL_REF[0]:g} / {TOL_REF[1]:g}; checked). Goals (met or not by the medians):\n\n{goal_lines}\n"
        + (f"\n{saved['note']}\n" if saved.get("note") else "")
    )
    write_section(heading, text)
    print(f"wrote '{heading}'")


# --------------------------------------------------------------------------------------------------
# ranks: W gloo processes
# --------------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, store: str, out: str, n: int, dim: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from cloob.config import LossConfig
    from cloob.train.distributed import DistInfo
    from cloob.train.global_loss import GlobalLoss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    info = DistInfo(rank, rank, world, torch.device("cpu"))
    modes = ("sharded", "replicated")

    def features(n_global: int):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n_global, dim, generator=g)
        y = x + torch.randn(n_global, dim, generator=g)
        b = n_global // world
        part = slice(rank * b, (rank + 1) * b)
        f = torch.nn.functional.normalize
        return f(x[part], dim=-1).clone().requires_grad_(True), f(y[part], dim=-1).clone().requires_grad_(True)

    def losses(n_global: int):
        return {m: GlobalLoss(LossConfig(method="cloob", beta=BETA, distributed=m, blocked=False), info, n_global)
                for m in modes}

    t = torch.tensor(INV_TAU)
    small, fns = losses(64 * world), losses(n)
    xs, ys = features(64 * world)
    for m in modes:  # warm-up: thread pool, gloo's buffers
        small[m](xs, ys, t)[0].backward()
    x, y = features(n)
    rec = {"rank": rank, "world": world, "plan": {m: fns[m].plan.describe(world) for m in modes},
           "wall": {m: [] for m in modes}, "cpu": {m: [] for m in modes}, "value": {}, "grad": {}}
    grads = {}
    for r in range(repeats):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            x.grad = y.grad = None
            dist.barrier()
            w0, c0 = time.perf_counter(), time.process_time()
            loss, value = fns[m](x, y, t)
            loss.backward()
            w1, c1 = time.perf_counter(), time.process_time()
            dist.barrier()
            rec["wall"][m].append(w1 - w0)
            rec["cpu"][m].append(c1 - c0)
            if r == 0:
                rec["value"][m] = float(value)
                grads[m] = x.grad.detach().clone()
    rec["grad_rel_diff"] = float((grads["sharded"] - grads["replicated"]).norm() / grads["replicated"].norm())
    Path(out, f"w{world}-rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


def ranks_main(args) -> int:
    import multiprocessing

    sys.path.insert(0, str(ROOT))
    worlds = [int(w) for w in args.worlds.split(",")]
    load_start = _load()
    print(f"# {_machine('cpu')}\n# load average at start: {load_start}", flush=True)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "cloob.train.global_loss"])
    out = Path(tempfile.mkdtemp(prefix="bench_ranks_"))
    rows, failed = [], []
    for world in worlds:
        if args.n % world:
            raise SystemExit(f"N = {args.n} does not split over {world} ranks")
        procs = [ctx.Process(target=_rank_main, args=(r, world, str(out / f"store{world}"), str(out), args.n, args.dim,
                                                      args.repeats)) for r in range(world)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=args.timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        if any(p.exitcode != 0 for p in procs):
            failed.append(f"W={world}: exit codes {[p.exitcode for p in procs]}")
            continue
        ranks = [json.loads((out / f"w{world}-rank{r}.json").read_text()) for r in range(world)]
        row = {"world": world, "rows_per_rank": args.n // world, "plan": ranks[0]["plan"], "load_after": _load(),
               "seconds": time.perf_counter() - t0}
        for m in ("sharded", "replicated"):
            per_round_max = [max(rk["wall"][m][i] for rk in ranks) for i in range(args.repeats)]
            per_round_mean = [statistics.fmean(rk["wall"][m][i] for rk in ranks) for i in range(args.repeats)]
            cpu_mean = [statistics.fmean(rk["cpu"][m][i] for rk in ranks) for i in range(args.repeats)]
            row[m] = {"wall_max": statistics.median(per_round_max), "wall_mean": statistics.median(per_round_mean),
                      "cpu_mean": statistics.median(cpu_mean), "wall_max_runs": per_round_max, "value": ranks[0]["value"][m]}
        values = [rk["value"][m] for rk in ranks for m in ("sharded", "replicated")]
        row["value_rel_diff"] = (max(values) - min(values)) / abs(row["replicated"]["value"])
        row["grad_rel_diff"] = max(rk["grad_rel_diff"] for rk in ranks)
        row["wall_ratio"] = row["sharded"]["wall_max"] / row["replicated"]["wall_max"]
        row["cpu_ratio"] = row["sharded"]["cpu_mean"] / row["replicated"]["cpu_mean"]
        rows.append(row)
        print(f"  W={world}: sharded {row['sharded']['wall_max']:.2f} s (cpu {row['sharded']['cpu_mean']:.2f}), replicated "
              f"{row['replicated']['wall_max']:.2f} s (cpu {row['replicated']['cpu_mean']:.2f}); ratio {row['wall_ratio']:.3f} "
              f"(1.3/W = {GOAL_SHARDED / world:.3f}); value rel diff {row['value_rel_diff']:.1e}, "
              f"x-grad {row['grad_rel_diff']:.1e} (load {row['load_after']})", flush=True)
    table = _ranks_table(rows)
    print("\n" + table)
    goals = [{"goal": f"W = {r['world']}: sharded per-rank time at most {GOAL_SHARDED:g}/W = {GOAL_SHARDED / r['world']:.3f} "
                      f"of the replicated", "measured": f"{r['wall_ratio']:.3f} (CPU time {r['cpu_ratio']:.3f})",
              "met": r["wall_ratio"] <= GOAL_SHARDED / r["world"]} for r in rows if r["world"] in (2, 4)]
    for g in goals:
        print(f"goal: {g['goal']}: {g['measured']} -> {'met' if g['met'] else 'NOT met'}")
    bad = [r for r in rows if r["value_rel_diff"] > TOL_BLOCKED or r["grad_rel_diff"] > TOL_BLOCKED]
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "goals": goals, "failed": failed, "date": _now()}, indent=1))
    if args.write and rows:
        worlds_txt = ", ".join(str(w) for w in worlds)
        heading = (f"## Per-rank loss time at W = {worlds_txt} gloo ranks for N = {args.n:,} global, d = {args.dim}, "
                   f"sharded vs full-per-rank (replicated)")
        goal_lines = "\n".join(f"- {g['goal']}: {g['measured']}: **{'met' if g['met'] else 'not met'}**" for g in goals)
        over = [w for w in worlds if w > (os.cpu_count() or 1)]
        loads = "; ".join(f"W={r['world']}: {r['load_after']}" for r in rows)
        text = (
            f"{heading}\n\n- Machine: {_machine('cpu')}; each rank 1 torch thread\n- Date: {_now()}\n"
            f"- Command: `{_command()}`\n- Load average (1/5/15 min) at start: {load_start}; after each W: "
            f"{loads} (the ranks themselves count)\n\n{table}\n\n"
            f"CLOOB (infoloob + hopfield), beta {BETA:g}, inv_tau {INV_TAU:g}, float32, unblocked. Each rank times forward + "
            f"backward of `GlobalLoss` on its own {args.n:,} / W rows between two barriers (the gathers included), the two "
            f"modes alternating by round in one process group; {args.repeats} rounds after a small warm-up call; per mode "
            f"the median over rounds of the slowest rank's wall time (the step waits for it), the mean over ranks, and the "
            f"mean CPU time (`time.process_time`). At W = 1 both modes are the same one-process full path. "
            + (f"W = {', '.join(map(str, over))} ranks on {os.cpu_count()} cores are oversubscribed: each rank gets a "
               f"share of a core, in both modes alike, so wall times there count the waiting and the CPU-time ratio is "
               f"the cleaner figure. " if over else "")
            + f"The sharded loss value equals the replicated one on every rank, and so does each rank's x-gradient "
            f"(rel diff in the table; checked to {TOL_BLOCKED:g}). Goals:\n\n{goal_lines}\n"
        )
        if failed:
            text += "\nFailed: " + "; ".join(failed) + "\n"
        write_section(heading, text)
        print(f"wrote '{heading}'")
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed or bad else 0


def _ranks_table(rows) -> str:
    lines = ["| W | rows per rank | sharded s per rank (slowest / mean) | replicated s per rank (slowest / mean) | "
             "sharded CPU s | replicated CPU s | sharded / replicated (wall) | (CPU) | 1.3 / W | loss value | "
             "value rel diff | x-grad rel diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, p = r["sharded"], r["replicated"]
        lines.append(f"| {r['world']} | {r['rows_per_rank']:,} | {s['wall_max']:.2f} / {s['wall_mean']:.2f} | "
                     f"{p['wall_max']:.2f} / {p['wall_mean']:.2f} | {s['cpu_mean']:.2f} | {p['cpu_mean']:.2f} | "
                     f"{r['wall_ratio']:.3f} | {r['cpu_ratio']:.3f} | {GOAL_SHARDED / r['world']:.3f} | {p['value']:.6f} | "
                     f"{r['value_rel_diff']:.1e} | {r['grad_rel_diff']:.1e} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", choices=["sizes", "ranks"])
    p.add_argument("--sizes", default="8192,16384,32768")
    p.add_argument("--dim", type=int, default=None, help="d (default 256 for sizes, 512 for ranks)")
    p.add_argument("--repeats", type=int, default=None, help="sizes: runs per N (default 3, 1 above 16384); ranks: rounds (3)")
    p.add_argument("--block", type=int, default=0, help="blocked path's rows per block (default: auto_block_rows)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precisions", default="fp32", help="sizes: fp32,tf32,bf16 (one process)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--one-process", action="store_true", help="sizes: every measurement in one process (CUDA's way)")
    p.add_argument("--warmup-at-n", action="store_true", help="sizes: one untimed call at each N first")
    p.add_argument("--big-n", type=int, default=16384, help="sizes, one process: above this N one call, no warm-up")
    p.add_argument("--reserve-gib", type=float, default=3.0, help="memory left to others under the address-space cap")
    p.add_argument("--n", type=int, default=8192, help="ranks: global batch")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--timeout", type=float, default=1200, help="ranks: seconds to wait for a group")
    p.add_argument("--json", default="", help="write the results as JSON here")
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    p.add_argument("--from-json", default="", help="sizes: write the section from a saved --json file")
    p.add_argument("--note", default="", help="sizes: a paragraph to end the section with (what the figures show)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--save-grad", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _sizes_child(args)
        return 0
    if args.what is None:
        p.error("say what to measure: sizes or ranks")
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        saved.setdefault("sizes", sorted({r["n"] for r in saved["records"]}))
        saved.setdefault("dim", saved["records"][0].get("dim"))
        saved.update({k: v for k, v in {"reserve_gib": 3.0, "cores": os.cpu_count(),
                                        "mem_total_gib": _proc_kib("/proc/meminfo", "MemTotal") / 2**20}.items()
                      if k not in saved})
        saved["rows"] = _summarise_sizes(saved["records"], saved["sizes"], list(IMPLS), ["fp32"])
        saved["goals"] = _sizes_goals(saved["rows"])
        saved["note"] = args.note or saved.get("note", "")
        _write_sizes(saved)
        return 0
    if args.what == "ranks":
        args.dim = args.dim or 512
        args.repeats = args.repeats or 3
        return ranks_main(args)
    args.dim = args.dim or 256
    return sizes_main(args)


if __name__ == "__main__":
    sys.exit(main())
