"""A run of another deployment (a GPU work pool), started from a task and waited for, saying why
it waits: a run that no worker takes is logged as waiting for a worker on that pool and, after
`worker_wait_s`, cancelled and failed with the reason, instead of leaving the pipeline Running in
silence (Prefect's run_deployment waits without a word, for ever with timeout=None).

Once a worker has taken the run it is waited for without a limit: a training may take days, and it
has its own deadline (train_deadline_s) and watchdog.
"""

from __future__ import annotations

import time

from prefect import get_run_logger

from cloob.errors import CloobError

# How often the task asks the server how its run is doing (run_deployment's default is 5 s; an
# evaluation of a small set takes about that long), and how often it says that it still waits.
POLL_S = 2.0
WAIT_LOG_S = 60.0
FIRST_SAY_S = 10.0  # a worker usually takes a run within seconds: say nothing before this
# An hour: long enough for a cluster to add a GPU node (and pull an image), short enough that a
# scheduled pipeline with no GPU worker at all fails the same day, saying so.
WORKER_WAIT_S = 3600.0

# Scheduled-type states in which the run waits for a worker (not for a concurrency slot, which a
# running training holds: that wait is logged but not timed).
_UNTAKEN = {"Scheduled", "Late"}


def _workers_online(client, pool: str) -> int | None:
    try:
        from prefect.client.schemas.objects import WorkerStatus

        return sum(1 for w in client.read_workers_for_work_pool(pool) if w.status == WorkerStatus.ONLINE)
    except Exception:  # an old server or no permission: say nothing about workers rather than fail
        return None


def run_and_wait(deployment: str, parameters: dict, flow_run_name: str | None = None,
                 worker_wait_s: float | None = WORKER_WAIT_S, poll_s: float = POLL_S):
    """Start a run of `deployment` as a subflow of this task's flow and return it once it has ended
    (its final state on it). CloobError if no worker took it within worker_wait_s (None: no limit)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    logger = get_run_logger()
    run = run_deployment(deployment, parameters=parameters, flow_run_name=flow_run_name, timeout=0, as_subflow=True)
    with get_client(sync_client=True) as client:
        pool = client.read_deployment(run.deployment_id).work_pool_name
        first_say = min(FIRST_SAY_S, worker_wait_s / 4 if worker_wait_s else FIRST_SAY_S)
        untaken_since, last_said = time.monotonic(), time.monotonic() - WAIT_LOG_S + first_say
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.is_final():
                return run
            name = state.name if state else "Scheduled"
            now = time.monotonic()
            if now - last_said >= WAIT_LOG_S and (name in _UNTAKEN or (state and state.is_scheduled())):
                last_said = now
                if name in _UNTAKEN:
                    limit = "no limit" if worker_wait_s is None else f"gives up after {worker_wait_s:.0f} s (worker_wait_s)"
                    # A warning: nothing goes on until a worker appears (and the UI shows warnings apart).
                    logger.warning("flow run %s of %s is %s: waiting for a worker on work pool %s (%s); %s", run.name,
                                   deployment, name, pool, _said_workers(_workers_online(client, pool)), limit)
                else:
                    logger.info("flow run %s of %s is %s: waiting for the deployment's concurrency slot (another "
                                "run of it holds it)", run.name, deployment, name)
            if name not in _UNTAKEN:
                untaken_since = now  # taken, or waiting for a slot: the limit is for a worker to appear
            elif worker_wait_s is not None and now - untaken_since >= worker_wait_s:
                client.set_flow_run_state(run.id, Cancelled(message=f"no worker on work pool {pool} took it "
                                                                   f"within {worker_wait_s:.0f} s"), force=True)
                raise CloobError(f"flow run {run.name} of deployment {deployment} waited {worker_wait_s:.0f} s "
                                 f"(worker_wait_s) and no worker on work pool {pool!r} took it "
                                 f"({_said_workers(_workers_online(client, pool))}); it was cancelled",
                                 f"start a worker on that pool (`prefect worker start --pool {pool}` on a machine that "
                                 "can run it, or the docker/compose.yaml GPU worker), then rerun the pipeline: it "
                                 "resumes where it stopped; or raise worker_wait_s")
            time.sleep(poll_s)


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
