"""Run one training run under torchrun as a supervised subprocess: its log, its progress, a deadline,
cancellation and a step watchdog, its error as one message, and no stray processes afterwards.

    result = launch("tiny", ["data.train=./shards"], nproc_per_node=2, deadline_s=3600)
    result.check()          # CloobError saying why the run did not finish, once, whatever the ranks
    result.checkpoint       # the latest complete checkpoint, e.g. for the registry

Between the ranks and this supervisor pass data, not console text (cloob.run.reports): each rank
writes a heartbeat and, when it fails, an error record into a private folder named in
CLOOB_REPORT_DIR; progress comes from metrics.jsonl, whose lines carry total_steps. The log lines are
passed on to `on_line` for people to read and are never parsed. The watchdog (cloob.run.watchdog)
stops a run whose ranks no longer make progress and names the rank at fault.

torchrun runs in its own session; it starts each rank in a session of its own too, so stopping a
run is more than one signal to a group: torchrun gets SIGTERM (it stops its ranks), and whatever of
the process tree seen during the run still runs after the grace period gets SIGKILL. If the
launching process itself dies, `cloob.run.torchrun` and the ranks die with it (cloob.run.lifeline). A
stopped run (deadline, cancel, crash) resumes from its last checkpoint when launched again with the
same recipe and overrides.

Stopping gives the ranks time to save: on SIGTERM they finish their step and write its checkpoint
(cloob.train.preemption). torchrun's agent waits for them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
before it sends SIGKILL (torch's default is 30), set here to train.stop_grace_s (120); this launcher
waits for torchrun that long plus _TORCHRUN_EXIT_S before its own SIGKILL (grace_s). Whatever stops
the launcher itself must wait longer still (deploy/k8s: terminationGracePeriodSeconds). A run the
watchdog stops cannot save (its ranks wait on the frozen one): it gets only _STALL_GRACE_S.

A rank that dies (SIGKILL, the OOM killer) ends the run within torchrun's own 30 s for the others
to exit; with train.max_restarts (or max_restarts=N here) torchrun restarts the whole group instead,
which resumes from the last checkpoint, and each restart is told as one line (cloob.run.torchrun
writes it down).

Callbacks (`on_line`, `on_progress`) run in the thread that called `launch`, never in a helper
thread, so they may use thread-bound context (a Prefect run logger, for one). The trainer (and
open_clip) is not imported here, only the recipe loader: it takes seconds to import.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cloob.config import Recipe, load_recipe
from cloob.errors import CloobError
from cloob.run import rank_fork, reports
from cloob.run.proctree import ProcessTree, still_running, stop_tree  # noqa: F401 (still_running: for callers)
from cloob.run.state import identify
from cloob.run.watchdog import Stall, Watchdog
from cloob.storage import Location
from cloob.train.checkpoint import CheckpointStore
from cloob.train.plan import check_before_start

log = logging.getLogger(__name__)

TAIL_LINES = 200  # kept in LaunchResult.log_tail for callers (flows.k8s_node prints them)
POLL_S = 1.0  # metrics.jsonl poll interval
_TICK_S = 0.1  # how often the wait loop looks at the deadline, the stop event and the process
_DRAIN_S = 5.0  # after torchrun exits: how long to wait for the end of its output
_TORCHRUN_EXIT_S = 15.0  # after its ranks' shutdown timeout: for torchrun to kill them and exit itself
_STALL_GRACE_S = 10.0  # a frozen rank: the others cannot save, so there is nothing to wait for
_RESUME = "rerun the same command to resume from the last checkpoint"


@dataclass
class LaunchResult:
    returncode: int | None  # torchrun's exit status; negative: killed by that signal; None: would not die
    run_dir: str
    checkpoint: str | None  # URL of the latest complete checkpoint after the run
    last_progress: dict | None  # the last metrics line seen (with total_steps)
    seconds: float
    timed_out: bool
    cancelled: bool
    log_tail: list[str]  # the last TAIL_LINES lines of torchrun's merged stdout/stderr
    command: list[str]
    pgid: int  # torchrun's pid and process group id; no process of the run exists after launch returns
    stall: Stall | None = None  # set when the step watchdog stopped the run
    error: dict | None = None  # the error record of the rank whose failure ended the run (cloob.run.reports)
    failures: dict[int, dict] = field(default_factory=dict)  # how torchrun saw each failed rank end
    preempted: dict | None = None  # set when SIGTERM stopped the ranks at a step boundary, with a checkpoint
    restarts: list[dict] = field(default_factory=list)  # each restart of the group by torchrun, in order
    max_restarts: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.cancelled and self.stall is None

    def check(self) -> LaunchResult:
        """Return self if the run finished; else raise one CloobError saying why."""
        if self.ok:
            return self
        where = f"last checkpoint: {self.checkpoint or 'none'}"
        if p := self.last_progress:
            of = f" of {p['total_steps']}" if p.get("total_steps") else ""
            where = f"at step {p.get('step')}{of}; {where}"
        if self.stall is not None:
            raise CloobError(f"training in {self.run_dir} stopped making progress: {self.stall.describe()}; "
                             f"the run was stopped ({where})",
                             "find what froze it (a hung GPU or filesystem, a stopped process), then "
                             f"{_RESUME}; train.watchdog_s=<seconds> sets the limit, 0 turns the watchdog off")
        if self.timed_out:
            raise CloobError(f"training in {self.run_dir} was stopped at its deadline after {self.seconds:.0f} s "
                             f"({where})", f"{_RESUME}, with a later deadline if it needs more time")
        if self.cancelled:
            raise CloobError(f"training in {self.run_dir} was cancelled after {self.seconds:.0f} s ({where})",
                             _RESUME)
        if (p := self.preempted) is not None:  # SIGTERM from outside, to torchrun or to the ranks
            written = f"checkpoint {os.path.basename(p['checkpoint'])} written" if p.get("checkpoint") else \
                "no checkpoint written"
            raise CloobError(f"training in {self.run_dir} was preempted by {signal.Signals(p['signal']).name} at "
                             f"step {p['step']}; {written}", _RESUME)
        e = self.error
        if e is not None and e.get("kind") == "cloob":  # the trainer's own message, as it would print it alone
            raise CloobError(_one_line(e["problem"]), _one_line(e["fix"]) if e.get("fix") else None)
        if e is not None and e.get("kind") != "peer":
            raise CloobError(f"training in {self.run_dir} failed on rank {e.get('rank')}: {_one_line(e['problem'])} "
                             f"({where})", f"see the traceback above; fix the cause, then {_RESUME}")
        if self.failures:
            rank, f = first_failure(self.failures)
            how = f"was killed by {f['signal']}" if f.get("signal") else f"exited with code {f.get('exitcode')}"
            hint = " (SIGKILL is also how the kernel's out-of-memory killer ends a process: see dmesg; lower " \
                   "train.batch_size or data.workers if so)" if f.get("signal") == "SIGKILL" else ""
            if self.restarts:
                where += f"; after {len(self.restarts)} restart(s) of the group, as many as train.max_restarts allows"
            elif not self.max_restarts:
                hint += ("; train.max_restarts=N (cloob train --max-restarts N) has torchrun restart the group "
                         "from its last checkpoint by itself")
            raise CloobError(f"training in {self.run_dir} failed: rank {rank} {how} without an error of its own "
                             f"({where})", f"see the log above{hint}; fix the cause, then {_RESUME}")
        if e is not None:
            raise CloobError(f"training in {self.run_dir} failed on rank {e.get('rank')}: {_one_line(e['problem'])} "
                             f"({where})", f"see the traceback above; fix the cause, then {_RESUME}")
        raise CloobError(f"training in {self.run_dir} failed (torchrun exit code {self.returncode}; {where})",
                         f"see the log above; fix the cause, then {_RESUME}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def first_failure(failures: dict[int, dict]) -> tuple[int, dict]:
    """The failed rank that ended the group, from torchrun's account {rank: {"signal", "exitcode",
    "time"}}. A rank killed from outside comes before the others' reactions to its end: a collective
    failing on them (exit code 1, a "peer" error) or torchrun stopping them (SIGTERM, or exit code 143
    from a rank that left on it, cloob.train.preemption)."""
    def order(kv):
        sig = kv[1].get("signal") or ("SIGTERM" if kv[1].get("exitcode") == 128 + signal.SIGTERM else None)
        return (0 if sig and sig != "SIGTERM" else 1 if not sig else 2, kv[1].get("time") or 0, kv[0])

    return min(failures.items(), key=order)


def restart_line(restart: dict, checkpoint: str | None) -> str:
    """The one line that says torchrun restarted the group, why, and from where it goes on."""
    rank, f = first_failure(restart["failures"]) if restart.get("failures") else ("?", {})
    how = f"died ({f['signal']})" if f.get("signal") else f"exited with code {f.get('exitcode')}"
    start = os.path.basename(checkpoint.rstrip("/")) if checkpoint else "the start (no checkpoint yet)"
    return (f"cloob train: rank {rank} {how}; restarting the group (restart {restart['restart']} of "
            f"{restart['max_restarts']}), resuming from {start}")


def build_command(recipe: str, overrides: list[str], *, nproc_per_node: int = 1, nnodes: int = 1,
                  node_rank: int = 0, rdzv_endpoint: str | None = None, max_restarts: int = 0) -> list[str]:
    """The torchrun command line that `launch` runs."""
    if nproc_per_node < 1 or nnodes < 1:
        raise CloobError(f"nproc_per_node={nproc_per_node}, nnodes={nnodes}", "both must be at least 1")
    if max_restarts < 0:
        raise CloobError(f"max_restarts={max_restarts}", "pass 0 (no restarts) or more")
    cmd = [sys.executable, "-m", "cloob.run.torchrun"]  # torchrun, ended if its launcher dies
    if nnodes == 1:
        cmd.append("--standalone")  # a rendezvous on a free local port: no endpoint needed
    else:
        if not rdzv_endpoint or ":" not in rdzv_endpoint:
            raise CloobError(f"a run on {nnodes} nodes needs a rendezvous endpoint (got {rdzv_endpoint!r})",
                             "pass rdzv_endpoint='HOST:PORT' of node 0, the same on every node")
        if not 0 <= node_rank < nnodes:
            raise CloobError(f"node_rank={node_rank} is not in 0..{nnodes - 1}", "give each node its own rank")
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", rdzv_endpoint]
    if max_restarts:  # restart the group after a failure; each new group resumes from the last checkpoint
        cmd += ["--max_restarts", str(max_restarts)]
    # Last override wins in load_recipe: no tqdm bar, whose carriage returns make a log unreadable.
    return cmd + ["--nproc_per_node", str(nproc_per_node), "-m", "cloob.train", recipe, *overrides,
                  "train.progress=false"]


class _MetricsTail:
    """Reads the lines appended to a metrics.jsonl since the last call.

    Lines already there at launch belong to an earlier attempt and are skipped. On resume the
    trainer rewrites the file (os.replace, a new inode) keeping the lines up to the resumed step; of
    that backlog only the newest line is reported."""

    def __init__(self, path: Path):
        self.path = path
        try:
            st = path.stat()
            self.ino, self.offset = st.st_ino, st.st_size
        except OSError:
            self.ino, self.offset = None, 0

    def read_new(self) -> list[dict]:
        try:
            f = open(self.path, "rb")
        except OSError:
            return []
        with f:
            st = os.fstat(f.fileno())
            replaced = self.ino is not None and (st.st_ino != self.ino or st.st_size < self.offset)
            if self.ino is None or replaced:
                self.ino, self.offset = st.st_ino, 0
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        rows = []
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
        return rows[-1:] if replaced else rows


def _resolve_run(recipe: str, overrides: list[str]) -> tuple[str, Path, Recipe]:
    """(run_dir, the local metrics.jsonl the trainer appends to, the recipe)."""
    r = load_recipe(recipe, overrides)  # raises the same CloobError the trainer would, before any start
    run_name, run_dir = r.run_id(), r.run_dir()
    where = Location(run_dir)
    if where.is_local:
        metrics = Path(where.root) / "metrics.jsonl"
    else:  # the trainer writes metrics to a local mirror under its working directory (ours)
        metrics = Path.cwd() / ".cloob-logs" / run_name / "metrics.jsonl"
    return run_dir, metrics, r


def _latest_checkpoint(run_dir: str) -> str | None:
    try:
        ref = CheckpointStore(run_dir).latest()
    except Exception as e:  # a storage error here must not hide how the run itself went
        log.info("could not list the checkpoints of %s: %s: %s", run_dir, type(e).__name__, e)
        return None
    return ref.url if ref else None


def launch(recipe: str, overrides: list[str], *, nproc_per_node: int = 1, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str | None = None, deadline_s: float | None = None,
           on_line: Callable[[str], None] | None = None, on_progress: Callable[[dict], None] | None = None,
           stop: threading.Event | None = None, env: dict | None = None, grace_s: float | None = None,
           max_restarts: int | None = None) -> LaunchResult:
    """Train `recipe` with `overrides` under torchrun and supervise it until it ends.

    deadline_s: seconds from now after which the run is stopped (SIGTERM to the group, SIGKILL after
    grace_s; default: the recipe's train.stop_grace_s, for the ranks to save, plus the time torchrun
    takes to exit). stop: set it from any thread to cancel the same way. The step watchdog
    (train.watchdog_s, see cloob.run.watchdog) stops it the same way when its ranks stop making
    progress. env: variables added to this process's environment for the run. on_line gets each
    output line (no newline), and at the end the traceback of a rank that failed with an error
    cloob does not know; on_progress gets each new metrics.jsonl line as a dict (with
    "total_steps"). Both run in this thread; an exception in them, or any exception or
    KeyboardInterrupt here, stops the group and is re-raised.
    max_restarts: how often torchrun restarts the group after a failure (default: train.max_restarts).
    A failed run is not raised: call .check() on the result. A bad recipe or override is raised at
    once (CloobError), before anything starts.
    """
    rank_fork.wanted({**os.environ, **(env or {})})  # a bad CLOOB_RANK_START: one error here, not in torchrun
    # The data version and the warm start, resolved here for every rank: the run's key and name.
    overrides = identify(recipe, overrides)
    run_dir, metrics_path, r = _resolve_run(recipe, [*overrides, "train.progress=false"])
    max_restarts = r.train.max_restarts if max_restarts is None else max_restarts
    command = build_command(recipe, overrides, nproc_per_node=nproc_per_node, nnodes=nnodes,
                            node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts)
    # The ranks' own checks, before torchrun starts them. Not the lock on several nodes: there any
    # launcher may start after another node's rank 0 (c10d's rendezvous picks that node) took it.
    check_before_start(r, nproc_per_node * nnodes, lock=nnodes == 1)
    # torchrun's agent gives its ranks this long after SIGTERM before SIGKILL (torch's default: 30 s).
    defaults = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(math.ceil(r.train.stop_grace_s))}
    if max_restarts:
        # The agent's rendezvous store, shared with the ranks by default, keeps the keys of the group
        # before a restart, and the new group's gloo/NCCL set-up may read the old addresses: it hung or
        # was refused in 3 of 6 restarts here (torch 2.15; pytorch/pytorch#135712). Unshared, rank 0
        # hosts a fresh store for each group, as torch did before 2.5.
        defaults["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env = {**defaults, **(env or {})}
    grace_s = r.train.stop_grace_s + _TORCHRUN_EXIT_S if grace_s is None else grace_s
    metrics = _MetricsTail(metrics_path)
    _sweep_report_dirs()
    report_dir = Path(tempfile.mkdtemp(prefix=f"cloob-run-{os.getpid()}-"))
    try:
        return _supervise(command, run_dir, metrics, report_dir, Watchdog(report_dir, nproc_per_node, r.train.watchdog_s),
                          deadline_s=deadline_s, on_line=on_line, on_progress=on_progress, stop=stop, env=env,
                          grace_s=grace_s, max_restarts=max_restarts)
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)


def _sweep_report_dirs() -> None:
    """Remove the report folders of launchers that were killed before they could (SIGKILL)."""
    for d in Path(tempfile.gettempdir()).glob("cloob-run-*-*"):
        try:
            pid = int(d.name.split("-")[2])
        except ValueError:
            continue
        if pid != os.getpid() and not psutil.pid_exists(pid):
            shutil.rmtree(d, ignore_errors=True)


def _supervise(command, run_dir, metrics: _MetricsTail, report_dir: Path, watchdog: Watchdog, *, deadline_s,
               on_line, on_progress, stop, env, grace_s, max_restarts) -> LaunchResult:
    # Unbuffered Python writes print()'s text and its newline separately, so the ranks' lines would
    # interleave mid-line in the shared pipe; line-buffered stderr (the default; the trainer and
    # torchrun log there) writes whole lines, as they happen.
    child_env = {**os.environ, "PYTHONUNBUFFERED": "", **(env or {}), "CLOOB_LAUNCHER_PID": str(os.getpid()),
                 reports.ENV: str(report_dir)}

    start = time.monotonic()
    proc = subprocess.Popen(command, env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            start_new_session=True)
    pgid = proc.pid  # start_new_session: torchrun leads its own session and process group
    tree = ProcessTree(pgid)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def read() -> None:  # only reads; the callbacks run in the caller's thread
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                lines.put(line)
        finally:
            lines.put(None)

    reader = threading.Thread(target=read, name=f"cloob-launch-{pgid}", daemon=True)
    reader.start()

    last_progress: dict | None = None
    stall: Stall | None = None
    restarts: list[dict] = []
    timed_out = cancelled = False

    def deliver(line: str) -> None:
        if on_line is not None:
            on_line(line)

    def poll_metrics() -> None:
        nonlocal last_progress
        for row in metrics.read_new():
            last_progress = row
            if on_progress is not None:
                on_progress(dict(row))

    def poll_restarts() -> None:
        for rec in reports.read_restarts(report_dir)[len(restarts):]:
            restarts.append(rec)
            line = restart_line(rec, _latest_checkpoint(run_dir))
            log.info("%s", line)
            deliver(line)

    try:
        eof, exited_at, next_poll = False, None, start + POLL_S
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is None:
                if deadline_s is not None and now - start >= deadline_s:
                    timed_out = True
                    break
                if stop is not None and stop.is_set():
                    cancelled = True
                    break
                if stall is not None:
                    break
            # Done when torchrun has exited and its output is read, or when something it left behind
            # still holds the pipe open a while later (stopped below like the rest of the group).
            elif eof or now - exited_at > _DRAIN_S:
                break
            if eof:
                time.sleep(_TICK_S)
            else:
                try:
                    item = lines.get(timeout=_TICK_S)
                except queue.Empty:
                    pass
                else:
                    if item is None:
                        eof = True
                    else:
                        # Metrics the trainer wrote before printing this line come first, so a
                        # caller's log reads in order ("step 500/500" before "done").
                        poll_metrics()
                        deliver(item)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_S
                tree.refresh()
                poll_metrics()
                poll_restarts()
                if exited_at is None:
                    stall = watchdog.poll()
        # A no-op when torchrun ended and left nothing behind.
        stop_tree(proc, tree, min(grace_s, _STALL_GRACE_S) if stall is not None else grace_s)
    except BaseException:
        stop_tree(proc, tree, grace_s)
        raise
    reader.join(timeout=5)  # the group is gone, so the pipe has no writer left
    poll_metrics()
    while True:  # lines that came in while stopping
        try:
            item = lines.get_nowait()
        except queue.Empty:
            break
        if item is not None:
            deliver(item)
    poll_metrics()
    poll_restarts()
    error = reports.root_cause(reports.read_errors(report_dir), attempt=len(restarts))
    if error is not None and error.get("kind") == "internal" and error.get("traceback"):
        for line in error["traceback"].rstrip("\n").splitlines():  # once, from the rank that failed first
            deliver(line)
    return LaunchResult(returncode=proc.returncode, run_dir=run_dir, checkpoint=_latest_checkpoint(run_dir),
                        last_progress=last_progress, seconds=time.monotonic() - start, timed_out=timed_out,
                        cancelled=cancelled, log_tail=list(tail), command=command, pgid=pgid, stall=stall,
                        error=error, failures=reports.read_failures(report_dir),
                        preempted=reports.read_preempted(report_dir, len(restarts)), restarts=restarts,
                        max_restarts=max_restarts)
