"""Where the test suite's CPU goes: the suite (or part of it) run under a /proc sampler, its CPU seconds
by kind of process and by test file.

The suite's time on a small machine is CPU-bound (the README's aim: under 10 minutes on 2 cores), and
most of its CPU is spent in the processes the tests start (torchrun ranks, Prefect servers and flow
runs, img2dataset's workers), not in pytest. `--durations` gives wall times, which a busy machine
inflates; this gives CPU seconds, attributed twice:
- by kind of process (a torchrun rank, a Prefect server, img2dataset's pool worker...), from a
  sampler reading /proc every 0.25 s (each process's own CPU, last seen; a process that lives less
  than a sample is missed, so the total is a lower bound);
- by test file, from each test's CPU including the children it reaped (a session-scoped server is
  charged to the test that ends it).

    python bench/suite_cpu.py                       # the whole suite, as the README runs it
    python bench/suite_cpu.py -- tests/test_prepare.py -n 0

Linux only (/proc). Prints the tables; nothing is written into BENCHMARKS.md (the figures depend on
the machine's load).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# First match wins: (substring of the command line, kind).
KINDS = (
    ("download.fetch", "img2dataset: fetch process"),
    ("spawn_main", "multiprocessing spawn child (img2dataset logger/pool workers, ...)"),
    ("cloob.run.torchrun", "torchrun agent"),
    ("torch.distributed.run", "torchrun agent"),
    ("-m cloob.train", "torchrun rank (and its forked loader workers)"),
    ("_workspace_supervisor", "Prefect flow-run process"),
    ("prefect.engine", "Prefect flow-run process"),
    ("uvicorn", "Prefect server (ephemeral, uvicorn)"),
    ("prefect server start", "Prefect server (prefect server start)"),
    ("prefect worker start", "Prefect worker"),
    ("flow-run execute", "Prefect flow-run process"),
    ("exec(eval(sys.stdin.readline()))", "pytest-xdist worker (in-process tests)"),
    ("pytest", "pytest"),
    ("raylet", "Ray"), ("gcs_server", "Ray"), ("ray/", "Ray"), ("ray.", "Ray"),
    ("java", "Spark (JVM)"), ("pyspark", "Spark (Python workers)"),
    ("moto", "moto S3 server"),
    ("flows.cli", "cloob CLI subprocess"), ("cloob.cli", "cloob CLI subprocess"), ("bin/cloob", "cloob CLI subprocess"),
)


def kind(cmd: str) -> str:
    for needle, name in KINDS:
        if needle in cmd:
            return name
    return "other python" if "python" in cmd else "other: " + cmd.split(" ", 1)[0].rsplit("/", 1)[-1][:30]


class Sampler(threading.Thread):
    """Each descendant of `root` (a process whose parent was one when first seen): its command line and
    its own CPU (utime + stime), last seen. Other processes of the machine are left out."""

    def __init__(self, root: int, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.interval_s, self.seen, self.stopping = interval_s, {}, threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.family = {str(root)}

    @staticmethod
    def _pids():
        return (p for p in os.listdir("/proc") if p.isdigit())

    @staticmethod
    def _test_file(pid: str) -> str:
        """The test file whose test started the process: pytest sets PYTEST_CURRENT_TEST in the
        environment during each test, and children inherit it (unless a test gives them a bare one)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                for var in f.read().split(b"\0"):
                    if var.startswith(b"PYTEST_CURRENT_TEST="):
                        return var.split(b"=", 1)[1].decode(errors="replace").split("::")[0]
        except OSError:
            pass
        return "?"

    def run(self):
        while not self.stopping.is_set():
            for pid in self._pids():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        stat = f.read()
                    rest = stat[stat.rindex(")") + 2:].split()
                    key = (pid, rest[19])  # pid and start time: a reused pid is another process
                    if key not in self.seen:
                        if pid not in self.family and rest[1] not in self.family:
                            continue
                        self.family.add(pid)
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                        if not cmd:
                            continue
                        self.seen[key] = [cmd, 0.0, self._test_file(pid)]
                    self.seen[key][1] = (int(rest[11]) + int(rest[12])) / self.tick
                except (OSError, ValueError, IndexError):
                    pass
            self.stopping.wait(self.interval_s)


PLUGIN = '''
import json, os, resource, time
import pytest

def _cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0, c0 = time.time(), _cpu()
    yield
    with open(os.path.join(os.environ["SUITE_CPU_DIR"], os.environ.get("PYTEST_XDIST_WORKER", "main") + ".jsonl"), "a") as f:
        f.write(json.dumps({"id": item.nodeid, "start": t0, "wall": time.time() - t0, "cpu": _cpu() - c0,
                            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}) + "\\n")
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=25, help="rows per table (default 25)")
    ap.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (default: the whole suite)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="suite-cpu-") as tmp:
        Path(tmp, "suite_cpu_plugin.py").write_text(PLUGIN)
        env = dict(os.environ, SUITE_CPU_DIR=tmp, PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]))
        t0, c0 = time.time(), os.times()
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "suite_cpu_plugin", "-q", *args.pytest_args],
                                cwd=ROOT, env=env)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        wall, c1 = time.time() - t0, os.times()
        sampler.stopping.set()
        sampler.join()
        tests = [json.loads(line) for p in Path(tmp).glob("*.jsonl") for line in p.read_text().splitlines()]

    reaped = c1.children_user + c1.children_system - c0.children_user - c0.children_system
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    by_file_kind = collections.defaultdict(lambda: [0, 0.0])
    for cmd, cpu, test_file in sampler.seen.values():
        for table, key in ((by_kind, kind(cmd)), (by_file_kind, (test_file, kind(cmd)))):
            table[key][0] += 1
            table[key][1] += cpu
    print(f"\npytest exit code {rc}; {wall:.0f} s wall; {reaped:.0f} s of CPU in all (user + sys, every process "
          f"reaped), {reaped / wall:.2f} cores on average on a {os.cpu_count()}-core machine")
    print(f"\nby kind of process (sampled: {sum(v[1] for v in by_kind.values()):.0f} s in {len(sampler.seen)} processes)")
    print(f"{'CPU s':>8} {'procs':>6} {'s/proc':>7}  kind")
    for name, (n, cpu) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{cpu:8.1f} {n:6d} {cpu / n:7.2f}  {name}")
    print("\nby test file and kind of process (the file whose test started it, from PYTEST_CURRENT_TEST)")
    print(f"{'CPU s':>8} {'procs':>6} {'s/proc':>7}  file: kind")
    for (name, k), (n, cpu) in sorted(by_file_kind.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{cpu:8.1f} {n:6d} {cpu / n:7.2f}  {name}: {k}")
    print("\ntests that wait the most (wall - CPU: sleeps, polls, time-outs, or a CPU it did not get)")
    print(f"{'wait s':>8} {'wall s':>7} {'CPU s':>6}  test")
    for t in sorted(tests, key=lambda t: t["cpu"] - t["wall"])[:args.top]:
        print(f"{t['wall'] - t['cpu']:8.1f} {t['wall']:7.1f} {t['cpu']:6.1f}  {t['id']}")
    if tests:  # each worker's last test: an idle tail at the end is time no ordering of files saved
        t_start = min(t["start"] for t in tests)
        print("\nworkers: when each ran its last test (s from the first test's start), and which")
        for w in sorted({t["worker"] for t in tests}):
            last = max((t for t in tests if t["worker"] == w), key=lambda t: t["start"] + t["wall"])
            print(f"  {w}: {last['start'] + last['wall'] - t_start:7.0f}  {last['id']}")
    files = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for t in tests:
        f = files[t["id"].split("::")[0]]
        f[0] += 1
        f[1] += t["cpu"]
        f[2] += t["wall"]
    print(f"\nby test file (each test's CPU with the children it reaped: {sum(f[1] for f in files.values()):.0f} s)")
    print(f"{'CPU s':>8} {'wall s':>7} {'tests':>6}  file")
    for name, (n, cpu, w) in sorted(files.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{cpu:8.1f} {w:7.1f} {n:6d}  {name}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
