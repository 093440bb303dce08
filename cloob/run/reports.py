"""What the processes of a run tell their launcher, as files rather than console text.

`cloob.run.launch` makes a private folder for each run and passes it to torchrun and every rank in
CLOOB_REPORT_DIR (a local folder, whether the run itself writes to a disk or to S3). In it:

    beat-<LOCAL_RANK>     the rank's heartbeat: {"rank", "pid", "step", "phase", "step_s"}, rewritten
                          in place at every phase of the loop; the launcher's step watchdog reads it
    error-<RANK>.json     written once by a rank that fails: {"rank", "kind", "problem", "fix", "type",
                          "traceback", "time", "attempt"}; kind is "cloob" (a CloobError: a message for
                          the user), "peer" (a collective failed, mostly because another rank died
                          first) or "internal" (anything else: a bug, with its traceback)
    preempted.json        written by the main rank when SIGTERM stopped the run at a step boundary:
                          {"signal", "step", "checkpoint", "time", "attempt"} (cloob.train.preemption)
    restart-<N>.json      written by cloob.run.torchrun each time torchrun restarts the group after a
                          failure (train.max_restarts): {"restart": N, "max_restarts", "failures": {rank:
                          how it ended}, "time"}
    torchrun.json         written by cloob.run.torchrun when torchrun reports failed ranks: how each
                          one ended (exit code or signal), also for a rank that could write nothing

"attempt" is torchrun's TORCHELASTIC_RESTART_COUNT: the records of a group that torchrun has since
restarted stay in the folder, and only those of the latest attempt say how the run ended. A
restarted rank rewrites its heartbeat in place (with its new pid).

The phases of a rank, in the order of its loop: "start" (until its first step in this process is
done: imports, rendezvous, model, checkpoint loading, the first batch and its step), then per step
"data" (waiting for the next batch) and "step" (computing it, collectives included), "save" around
a checkpoint, "done" at the end. `step` is the number of steps completed.

Without CLOOB_REPORT_DIR (a bare `torchrun -m cloob.train`) nothing is written, and the trainer
prints its errors itself. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

ENV = "CLOOB_REPORT_DIR"
PHASES = ("start", "save", "data", "step", "done")  # the order within one step count (see below)
_BEAT_SIZE = 256  # a heartbeat is one fixed-size record written in place with a single pwrite


def report_dir() -> Path | None:
    d = os.environ.get(ENV)
    return Path(d) if d else None


# -------------------------------------------------------------------------------- rank side

class _Heartbeat:
    def __init__(self, path: Path, rank: int):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.rank, self.pid = rank, os.getpid()
        self.phase, self.step, self.first_step = None, None, None
        self.iter_start, self.data_step, self.saved, self.step_s = None, None, False, None

    def __call__(self, phase: str, step: int) -> None:
        if phase == "start":
            self.first_step = step
        elif step == self.first_step and phase != "done":
            return  # still the first step of this process: start-up until it is done
        if (phase, step) == (self.phase, self.step):
            return
        now = time.perf_counter()
        if phase == "data":
            # The time of one loop iteration (data + compute), unless a checkpoint was saved in it.
            if self.iter_start is not None and not self.saved and step == self.data_step + 1:
                self.step_s = now - self.iter_start
            self.iter_start, self.data_step, self.saved = now, step, False
        elif phase == "save":
            self.saved = True
        self.phase, self.step = phase, step
        record = json.dumps({"rank": self.rank, "pid": self.pid, "step": step, "phase": phase,
                             "step_s": self.step_s}).encode()
        os.pwrite(self.fd, record.ljust(_BEAT_SIZE)[:_BEAT_SIZE], 0)


_beat: _Heartbeat | None | bool = False  # False: not set up yet; None: no launcher to report to


def beat(phase: str, step: int) -> None:
    """Record where this rank is (see the module docstring); a few microseconds, a no-op without a
    launcher."""
    global _beat
    if _beat is False:
        d = report_dir()
        _beat = _Heartbeat(d / f"beat-{os.environ.get('LOCAL_RANK', '0')}", int(os.environ.get("RANK", "0"))) \
            if d else None
    if _beat is not None:
        _beat(phase, step)


def attempt() -> int:
    """Which start of the group this process belongs to: 0, then 1 after torchrun's first restart..."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def write_error(kind: str, problem: str, fix: str | None = None, *, type_name: str | None = None,
                traceback: str | None = None) -> bool:
    """This rank's error record for its launcher; False when there is no launcher (print it then)."""
    d = report_dir()
    if d is None:
        return False
    rank = int(os.environ.get("RANK", "0"))
    _write_json(d / f"error-{rank}.json", {"rank": rank, "kind": kind, "problem": problem, "fix": fix,
                                            "type": type_name, "traceback": traceback, "time": time.time(),
                                            "attempt": attempt()})
    return True


def write_preempted(signum: int, step: int, checkpoint: str | None) -> bool:
    """The main rank's record that the run stopped after `step` with `checkpoint` written; False
    when there is no launcher (print the line then)."""
    d = report_dir()
    if d is None:
        return False
    _write_json(d / "preempted.json", {"signal": signum, "step": step, "checkpoint": checkpoint,
                                        "time": time.time(), "attempt": attempt()})
    return True


def write_restart(restart: int, max_restarts: int, failures: dict[int, dict]) -> bool:
    """torchrun has restarted the group (restart `restart` of `max_restarts`) after `failures`."""
    d = report_dir()
    if d is None:
        return False
    _write_json(d / f"restart-{restart}.json", {"restart": restart, "max_restarts": max_restarts,
                                                 "failures": {str(k): v for k, v in failures.items()},
                                                 "time": time.time()})
    return True


def write_failures(failures: dict[int, dict]) -> bool:
    """torchrun's account of its failed ranks: {rank: {"exitcode", "signal", "pid", "time"}}."""
    d = report_dir()
    if d is None:
        return False
    _write_json(d / "torchrun.json", {str(k): v for k, v in failures.items()})
    return True


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # the launcher reads all of it or nothing


# ---------------------------------------------------------------------------- launcher side

def read_beats(d: Path) -> dict[int, dict]:
    """{local rank: its latest heartbeat}; a record caught mid-write is left for the next read."""
    out = {}
    for p in d.glob("beat-*"):
        try:
            out[int(p.name.removeprefix("beat-"))] = json.loads(p.read_bytes().rstrip())
        except (OSError, ValueError):
            continue
    return out


def read_errors(d: Path) -> list[dict]:
    out = []
    for p in sorted(d.glob("error-*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def read_restarts(d: Path) -> list[dict]:
    """The group's restarts so far, in order."""
    out = []
    for p in d.glob("restart-*.json"):
        try:
            rec = json.loads(p.read_text())
            rec["failures"] = {int(k): v for k, v in rec.get("failures", {}).items()}
            out.append(rec)
        except (OSError, ValueError, AttributeError):
            continue
    return sorted(out, key=lambda r: r.get("restart", 0))


def read_preempted(d: Path, latest_attempt: int) -> dict | None:
    """The preemption record of the latest attempt, if its ranks stopped that way."""
    try:
        rec = json.loads((d / "preempted.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("attempt", 0) == latest_attempt else None


def read_failures(d: Path) -> dict[int, dict]:
    try:
        return {int(k): v for k, v in json.loads((d / "torchrun.json").read_text()).items()}
    except (OSError, ValueError):
        return {}


def root_cause(errors: list[dict], attempt: int | None = None) -> dict | None:
    """The error that ended the run: of those of `attempt` (default: the latest there is; the
    groups before it were restarted), the first one that is not a rank's reaction to another's end
    (a collective failing because a peer died). Every rank raising the same CloobError gives one."""
    if attempt is None and errors:
        attempt = max(e.get("attempt", 0) for e in errors)
    errors = [e for e in errors if e.get("attempt", 0) == attempt]
    if not errors:
        return None
    own = [e for e in errors if e.get("kind") != "peer"] or errors
    return min(own, key=lambda e: (e.get("time") or 0, e.get("rank") or 0))
