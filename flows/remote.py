"""A run of another deployment (a GPU work pool), started from a task and waited for, saying why
it waits: a run that no worker takes is logged as waiting for a worker on that pool and, after
`worker_wait_s`, cancelled and failed with the reason, instead of leaving the pipeline Running in
silence (Prefect's run_deployment waits without a word, for ever with timeout=None).

Once a worker has taken the run it is waited for without a limit: a training may take days, and it
has its own deadline (train_deadline_s) and watchdog. Two things may still end it from outside:
- its process dies (an OOM kill, a pod deleted): its worker reports it Crashed at once;
- its node dies, the worker with it: nobody reports anything, and the run would stay Running for
  ever. Its flow-run heartbeats (an event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY s, default 180)
  stop; after CLOOB_LOST_AFTER_S (default 600) without one the run is marked Crashed here.
`run_resubmitting` starts a Crashed run again, a bounded number of times: a training resumes from
its last checkpoint, an evaluation redoes its one pair. A Failed run (an error in the code or the
data) is not resubmitted: it would fail the same way.

The server being away (a restart) is ridden out for CLOOB_API_OUTAGE_S (flows/outage.py).
"""

from __future__ import annotations

import time
import uuid

from prefect import get_run_logger

from cloob.errors import CloobError
from flows.outage import Outage

# How often the task asks the server how its run is doing (run_deployment's default is 5 s; an
# evaluation of a small set takes about that long), and how often it says that it still waits.
POLL_S = 2.0
WAIT_LOG_S = 60.0
FIRST_SAY_S = 10.0  # a worker usually takes a run within seconds: say nothing before this
# An hour: long enough for a cluster to add a GPU node (and pull an image), short enough that a
# scheduled pipeline with no GPU worker at all fails the same day, saying so.
WORKER_WAIT_S = 3600.0
# A Running run with no heartbeat for this long is lost: three of Prefect's default 180 s heartbeats
# and some, so that a busy server or a slow event pipeline does not make a live run look dead.
LOST_ENV, LOST_AFTER_S = "CLOOB_LOST_AFTER_S", 600.0
HEARTBEAT_CHECK_S = 10.0  # heartbeats come every 30 s at the most: no need to ask more often
# How many times a Crashed run is started again (the pipeline's train_retries).
RETRIES = 2

# Scheduled-type states in which the run waits for a worker (not for a concurrency slot, which a
# running training holds: that wait is logged but not timed).
# States in which the run waits for a worker to take it: new, overdue, or rescheduled after it was stopped
# (a preempted pod's run is AwaitingRetry until a worker starts it again). worker_wait_s counts in these.
_UNTAKEN = {"Scheduled", "Late", "AwaitingRetry"}


def waiting_for(name: str) -> str:
    """What a run in the not-yet-running state `name` waits for, as the wait's log line says it."""
    if name == "AwaitingConcurrencySlot":
        return "the deployment's concurrency slot (another run of it holds it)"
    if name == "AwaitingRetry":
        return "a worker to resume it (it was stopped and rescheduled)"
    if name in _UNTAKEN:
        return "a worker"
    return "its start"


def _workers_online(client, pool: str) -> int | None:
    try:
        from prefect.client.schemas.objects import WorkerStatus

        return sum(1 for w in client.read_workers_for_work_pool(pool) if w.status == WorkerStatus.ONLINE)
    except Exception:  # an old server or no permission: say nothing about workers rather than fail
        return None


def lost_after_s() -> float:
    from cloob.settings import env_number

    return env_number(LOST_ENV, LOST_AFTER_S)


def crashed(run) -> bool:
    """The run's process or node died (reported by its worker, or found lost here)."""
    return bool(run.state and run.state.is_crashed())


def run_resubmitting(deployment: str, parameters: dict, flow_run_name: str | None, worker_wait_s: float | None,
                     retries: int = RETRIES, what: str = "run"):
    """run_and_wait, and again (at most `retries` times) while the run ends Crashed; the last run.
    Each new run gets the same parameters and the name `<name>-retry<n>`."""
    logger = get_run_logger()
    for attempt in range(retries + 1):
        name = flow_run_name if not attempt or not flow_run_name else f"{flow_run_name}-retry{attempt}"
        run = run_and_wait(deployment, parameters, name, worker_wait_s)
        if not crashed(run) or attempt == retries:
            return run
        logger.warning("%s %s on %s ended %s: starting it again (retry %d of %d), where it stopped", what, run.name,
                       deployment, ended(run), attempt + 1, retries)
    raise AssertionError("unreachable")


def run_and_wait(deployment: str, parameters: dict, flow_run_name: str | None = None,
                 worker_wait_s: float | None = WORKER_WAIT_S, poll_s: float = POLL_S):
    """Start a run of `deployment` as a subflow of this task's flow and return it once it has ended
    (its final state on it). CloobError if no worker took it within worker_wait_s (None: no limit),
    or if the server stayed away longer than CLOOB_API_OUTAGE_S. A run whose heartbeats stopped for
    CLOOB_LOST_AFTER_S is marked Crashed, and returned."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled, Crashed

    logger = get_run_logger()
    outage = Outage(f"flow run {flow_run_name or ''} of {deployment}".replace("  ", " "), logger)
    # The key makes a retried create (its answer lost to an outage) return the run it made, not a second.
    key = str(uuid.uuid4())
    run = outage.call(run_deployment, deployment, parameters=parameters, flow_run_name=flow_run_name, timeout=0,
                      as_subflow=True, idempotency_key=key)
    with get_client(sync_client=True) as client:
        pool = outage.call(client.read_deployment, run.deployment_id).work_pool_name
        beats = Heartbeats(client, run.id, lost_after_s(), outage, logger)
        first_say = min(FIRST_SAY_S, worker_wait_s / 4 if worker_wait_s else FIRST_SAY_S)
        untaken_since, last_said = time.monotonic(), time.monotonic() - WAIT_LOG_S + first_say
        while True:
            run = outage.call(client.read_flow_run, run.id)
            state = run.state
            if state is not None and state.is_final():
                return run
            if state is not None and state.is_running() and (lost := beats.lost()):
                outage.call(client.set_flow_run_state, run.id, Crashed(message=lost), force=True)
                logger.warning("flow run %s of %s: %s", run.name, deployment, lost)
                return outage.call(client.read_flow_run, run.id)
            name = state.name if state else "Scheduled"
            now = time.monotonic()
            if now - last_said >= WAIT_LOG_S and (name in _UNTAKEN or (state and state.is_scheduled())):
                last_said = now
                if name in _UNTAKEN:
                    limit = "no limit" if worker_wait_s is None else f"gives up after {worker_wait_s:.0f} s (worker_wait_s)"
                    # A warning: nothing goes on until a worker appears (and the UI shows warnings apart).
                    logger.warning("flow run %s of %s is %s: waiting for %s on work pool %s (%s); %s", run.name,
                                   deployment, name, waiting_for(name), pool,
                                   _said_workers(_workers_online(client, pool)), limit)
                else:
                    logger.info("flow run %s of %s is %s: waiting for %s", run.name, deployment, name, waiting_for(name))
            if name not in _UNTAKEN:
                untaken_since = now  # taken, or waiting for a slot: the limit is for a worker to appear
            elif worker_wait_s is not None and now - untaken_since >= worker_wait_s:
                outage.call(client.set_flow_run_state, run.id, Cancelled(
                    message=f"no worker on work pool {pool} took it within {worker_wait_s:.0f} s"), force=True)
                raise CloobError(f"flow run {run.name} of deployment {deployment} waited {worker_wait_s:.0f} s "
                                 f"(worker_wait_s) and no worker on work pool {pool!r} took it "
                                 f"({_said_workers(_workers_online(client, pool))}); it was cancelled",
                                 f"start a worker on that pool (`prefect worker start --pool {pool}` on a machine that "
                                 "can run it, or the docker/compose.yaml GPU worker), then rerun the pipeline: it "
                                 "resumes where it stopped; or raise worker_wait_s")
            time.sleep(poll_s)


class Heartbeats:
    """Whether a Running flow run still beats: its newest `prefect.flow-run.heartbeat` event, read
    from the server's events every HEARTBEAT_CHECK_S. Timed by this machine's clock (when a new beat
    was first seen), not by the events' own times, so that clocks that differ between machines do
    not matter; an outage of the server restarts the clock (no beat could arrive meanwhile).

    A run that never beat is never called lost: its worker may have heartbeats off
    (PREFECT_FLOWS_HEARTBEAT_FREQUENCY unset) or the server may not keep events; that is said once."""

    def __init__(self, client, run_id, limit_s: float, outage: Outage, logger, clock=time.monotonic):
        self.client, self.run_id, self.limit_s, self.outage, self.logger = client, run_id, limit_s, outage, logger
        self.clock = clock
        self.newest = None
        self.since: float | None = None  # when the run was first seen Running, or a new beat first seen
        self.checked = float("-inf")
        self.said_none = False

    def lost(self) -> str | None:
        now = self.clock()
        if self.since is None:
            self.since = now
        if self.outage.ended_at is not None:
            self.since = max(self.since, self.outage.ended_at)
        if now - self.checked < HEARTBEAT_CHECK_S:
            return None
        self.checked = now
        newest = self._newest()
        if newest is not None and newest != self.newest:
            self.newest, self.since = newest, now
        silent = now - self.since
        if silent < self.limit_s:
            return None
        if self.newest is None:
            if not self.said_none:
                self.said_none = True
                self.logger.warning("flow run %s has sent no heartbeat in %.0f s: a lost worker cannot be told here "
                                    "(set PREFECT_FLOWS_HEARTBEAT_FREQUENCY on the workers, and keep the server's event "
                                    "persister on); it is waited for without a limit", self.run_id, silent)
            return None
        return (f"no heartbeat for {silent:.0f} s ({LOST_ENV}={self.limit_s:.0f}; last at {self.newest:%H:%M:%S} "
                "UTC): its worker or node is gone")

    def _newest(self):
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        try:
            page = self.outage.call(self.client.read_events, EventFilter(
                event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{self.run_id}"])), limit=1)
        except CloobError:
            raise
        except Exception:  # a server without the events API: no heartbeats to judge by
            return None
        return page.events[0].occurred if page.events else None


def _said_workers(n: int | None) -> str:
    return "workers unknown" if n is None else "no worker online" if n == 0 else f"{n} worker{'s' * (n != 1)} online"


def ended(run) -> str:
    """A deployment run's final state and the problem it reported, without the nested `fix:` lines of
    its own error (the caller gives the fix that applies from here)."""
    if not run.state:
        return "in an unknown state"
    problem = " ".join(line.strip() for line in (run.state.message or "").splitlines() if
                       not line.strip().startswith("fix:"))
    return f"{run.state.name}: {problem}" if problem else run.state.name
