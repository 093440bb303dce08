"""The step watchdog: notices a run whose ranks stopped making progress and names the rank at fault.

torchrun watches only whether its ranks are alive. A rank that is alive but frozen (a hung GPU or
filesystem, a stopped process) leaves the others waiting in a collective until the process-group
timeout (train.process_group_timeout_s, 30 minutes by default). The launcher polls the ranks'
heartbeats (cloob.run.reports) and fails the run when one has not moved on for longer than its
limit:

- while training: train.watchdog_s if set, else max(STEP_FLOOR_S, STEP_MULTIPLE x the median time of
  a recent step). 20 steps' time is far outside the spread of step times seen on a loaded machine;
  the 300 s floor covers what can stall one step of a healthy run: an object-store read retried
  after botocore's 60 s connect and read timeouts, a slow shard at an epoch's start, a log step;
- at start-up (imports, rendezvous, model, checkpoint loading, torch.compile, the first batch and
  step) and while a checkpoint is saved: at least PHASE_FLOOR_S = 15 minutes, which a first step
  under torch.compile or a multi-GB checkpoint written to a slow bucket can take; half the default
  process-group timeout.
- train.watchdog_s=0 turns the watchdog off.

Naming the rank: every rank waits for the slowest, so all stop at about the same moment. The one at
fault is the furthest behind in its loop (fewest steps done, then its phase: a rank still waiting
for data holds up those already computing); among equals, one whose process is stopped, in
uninterruptible sleep or dead. Where that leaves several (all wait in one collective), all are named.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from cloob.run.reports import PHASES, read_beats

STEP_MULTIPLE = 20
STEP_FLOOR_S = 300.0
PHASE_FLOOR_S = 900.0
_FROZEN = {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_DISK_SLEEP, psutil.STATUS_ZOMBIE,
           psutil.STATUS_DEAD}
_WAITING = {"start": "has not finished starting", "save": "has not finished saving the checkpoint of step",
            "data": "is waiting for the data of step", "step": "has not finished step"}


@dataclass
class Stall:
    ranks: list[int]  # global ranks named as the cause
    step: int  # steps they had done
    phase: str
    idle_s: float  # how long the first of them had not moved on
    limit_s: float
    states: dict[int, str]  # process state of each named rank
    step_s: float | None  # the median step time the limit came from, if measured

    def describe(self) -> str:
        which = f"rank {self.ranks[0]}" if len(self.ranks) == 1 else \
            "ranks " + ", ".join(map(str, self.ranks)) + " (each waits in the same place)"
        state = "; ".join(f"rank {r} is {s}" for r, s in self.states.items() if s)
        step = self.step + (self.phase in ("data", "step"))
        where = _WAITING[self.phase] + ("" if self.phase == "start" else f" {step}")
        took = f", a step takes {self.step_s:.2g} s" if self.step_s else ""
        return (f"{which} {where} for {self.idle_s:.0f} s (watchdog limit {self.limit_s:.0f} s{took})"
                f"{'; ' + state if state else ''}")


class Watchdog:
    """poll() once in a while; it returns a Stall when the run must be stopped."""

    def __init__(self, folder: Path, nproc: int, limit_s: float | None, clock=time.monotonic):
        self.folder, self.nproc, self.limit_s, self.clock = folder, nproc, limit_s, clock
        self.started = clock()
        self.seen: dict[int, tuple] = {}  # local rank -> (its (step, phase), when that was first seen)
        self.beats: dict[int, dict] = {}
        self.step_times: collections.deque[float] = collections.deque(maxlen=50)

    def limit(self, phase: str) -> float:
        if self.limit_s == 0:
            return math.inf
        if phase in ("start", "save"):
            return max(PHASE_FLOOR_S, self.limit_s or 0)
        if self.limit_s:
            return self.limit_s
        return max(STEP_FLOOR_S, STEP_MULTIPLE * self.median_step_s()) if self.step_times else PHASE_FLOOR_S

    def median_step_s(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None

    def poll(self) -> Stall | None:
        now = self.clock()
        for local, b in read_beats(self.folder).items():
            where = (b.get("step"), b.get("phase"))
            if local not in self.seen or self.seen[local][0] != where:
                self.seen[local] = (where, now)
                if b.get("step_s"):
                    self.step_times.append(float(b["step_s"]))
            self.beats[local] = b
        overdue = False
        for local in range(self.nproc):
            if local in self.seen:
                (_, phase), since = self.seen[local]
            else:  # not even imported yet
                phase, since = "start", self.started
            if phase != "done" and now - since > self.limit(phase):
                overdue = True
        return self._stall(now) if overdue else None

    def _stall(self, now: float) -> Stall:
        def key(local):
            b = self.beats.get(local)
            return (-1, 0) if b is None else (b["step"], PHASES.index(b["phase"]))

        live = [lr for lr in range(self.nproc) if (self.beats.get(lr) or {}).get("phase") != "done"]
        behind = min(key(lr) for lr in live)
        named = [lr for lr in live if key(lr) == behind]
        states = {lr: _state(self.beats.get(lr)) for lr in named}
        frozen = [lr for lr in named if states[lr] in _FROZEN]
        if frozen:
            named = frozen
        first = min(self.seen[lr][1] if lr in self.seen else self.started for lr in named)
        b = self.beats.get(named[0]) or {"step": 0, "phase": "start"}
        rank_of = {lr: (self.beats.get(lr) or {}).get("rank", lr) for lr in named}
        return Stall(ranks=[rank_of[lr] for lr in named], step=b["step"], phase=b["phase"], idle_s=now - first,
                     limit_s=self.limit(b["phase"]), states={rank_of[lr]: states[lr] for lr in named},
                     step_s=self.median_step_s())


def _state(beat: dict | None) -> str:
    if not beat:
        return ""
    try:
        return psutil.Process(beat["pid"]).status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_DEAD
    except psutil.Error:
        return ""
