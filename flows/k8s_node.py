"""Entrypoint of each pod of a training Job on the Kubernetes GPU pool (deploy/k8s/gpu-job-template.json).

    tini -- python -m flows.k8s_node <the command Prefect's worker gives, e.g. prefect flow-run execute>

The Job is an Indexed Job of `nnodes` pods. Pod 0 (JOB_COMPLETION_INDEX 0, or unset outside an
Indexed Job) is the flow run: it runs the given command, so the `cloob-train` flow runs as Prefect
meant it and starts torchrun as node 0 (at $CLOOB_RDZV_ENDPOINT, node 0's own DNS name). In a Job
(PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR set, as prefect-kubernetes always does) it runs it as a
child and outlives it: after SIGTERM, Prefect's `flow-run execute` reschedules the run and exits
within about 30 s, while the ranks may still be writing their checkpoint (`_supervise`); elsewhere it
execs the command. Every other pod is a worker node with no flow run of its own: it reads the flow
run's parameters from the Prefect API (the worker puts PREFECT__FLOW_RUN_ID and PREFECT_API_URL in
every pod's environment), runs `cloob.run.launch.launch` with the same recipe and overrides as node
`index`, and exits with its status.

A worker node also watches the flow run: if it ends while this node still waits or trains (node 0
found the run already trained and skipped it, failed before the rendezvous, or was cancelled), this
node stops its torchrun rather than wait for a rendezvous that will never come.

With the c10d rendezvous torchrun gives out the global ranks itself (it ignores --node_rank), so the
rank that writes checkpoints may run on any pod: the store must be shared (a bucket), as it is for
the pipeline anyway.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from cloob.errors import CloobError

WATCH_S = 10.0  # how often a worker node looks at the flow run's state
# Node 0, after the flow run's command ended: how long it waits for what that command left running (a
# training's ranks still writing the checkpoint of their last step). Above train.stop_grace_s (120 s)
# plus the launcher's 15 s, below the template's terminationGracePeriodSeconds (180 s).
DRAIN_S = 160.0
_PR_SET_CHILD_SUBREAPER = 36
DNS_WAIT_S = 600.0  # how long a pod waits for node 0's DNS name (node 0 may still be pulling its image)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}  # Prefect state types after which nothing runs


def _index() -> int:
    raw = os.environ.get("JOB_COMPLETION_INDEX", "").strip()
    try:
        return int(raw) if raw else 0
    except ValueError:
        raise CloobError(f"JOB_COMPLETION_INDEX={raw!r} is not a number",
                         "run this in an Indexed Job (completionMode: Indexed)") from None


def _shape() -> tuple[int, int] | None:
    """(nnodes, gpus_per_node) the Job was made for, from CLOOB_K8S_SHAPE='NxG' (the job template)."""
    raw = os.environ.get("CLOOB_K8S_SHAPE", "").strip()
    if not raw:
        return None
    try:
        n, g = (int(x) for x in raw.split("x"))
    except ValueError:
        raise CloobError(f"CLOOB_K8S_SHAPE={raw!r} is not NODESxGPUS", "use the job template in deploy/k8s/") from None
    return n, g


def flow_run(flow_run_id: str) -> tuple[dict, str | None]:
    """(parameters, state type or None) of a flow run, from the Prefect API."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
    return dict(run.parameters or {}), (run.state.type.value if run.state else None)


def _flow_run_id() -> str:
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID", "").strip()
    if not run_id:
        raise CloobError("PREFECT__FLOW_RUN_ID is not set: this pod does not know its flow run",
                         "start training pods through the Prefect Kubernetes worker (pool cloob-gpu-k8s)")
    return run_id


def check_shape(params: dict, shape: tuple[int, int] | None) -> None:
    """The flow run's nnodes must be the Job's pod count: otherwise the rendezvous never completes."""
    if shape is None:
        return
    nnodes, gpus = shape
    if int(params.get("nnodes", 1)) != nnodes:
        raise CloobError(f"the flow run asks for nnodes={params.get('nnodes', 1)}, but this Job has {nnodes} pods",
                         f"run the deployment with nnodes={nnodes}, or set the job variable nnodes to the same value")
    if int(params.get("nproc_per_node", 1)) > gpus:
        raise CloobError(f"the flow run asks for nproc_per_node={params.get('nproc_per_node')}, but each pod has "
                         f"{gpus} GPU(s)", f"run it with nproc_per_node <= {gpus}, or raise the job variable "
                         "gpus_per_node")


def _wait_for_dns(endpoint: str, timeout: float) -> None:
    host = endpoint.rsplit(":", 1)[0]
    end = time.monotonic() + timeout
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror:
            if time.monotonic() >= end:
                raise CloobError(f"node 0's address {host} does not resolve after {timeout:.0f} s",
                                 "create the headless Service once per namespace: "
                                 "kubectl apply -f deploy/k8s/rdzv-service.yaml") from None
            time.sleep(2)


def run_node0(command: list[str]) -> int:
    """Become the flow run's command (never returns on success)."""
    if not command:
        raise CloobError("no command to run on node 0", "the Prefect worker passes it as the container's args")
    shape = _shape()
    if shape is not None and os.environ.get("PREFECT__FLOW_RUN_ID"):
        try:
            params, _ = flow_run(os.environ["PREFECT__FLOW_RUN_ID"])
        except Exception as e:  # the engine itself will report an unreachable API; no reason to stop here
            print(f"k8s_node: could not read the flow run's parameters to check them ({e}); going on",
                  file=sys.stderr)
        else:
            check_shape(params, shape)
    endpoint = os.environ.get("CLOOB_RDZV_ENDPOINT")
    if shape is not None and shape[0] > 1 and endpoint:
        # torchrun hosts the rendezvous only where the endpoint's name resolves to this pod's own
        # address (torch's _matches_machine_hostname); before the headless Service publishes that
        # name, node 0 would join as a client of a rendezvous that nobody hosts.
        _wait_for_dns(endpoint, DNS_WAIT_S)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR") and _become_subreaper():
        return _supervise(command)
    os.execvp(command[0], command)
    return 127  # only reached when execvp is replaced (tests)


def _become_subreaper() -> bool:
    """Processes orphaned below this one are re-parented to it (not to PID 1), so it can wait for them."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _supervise(command: list[str], drain_s: float | None = None) -> int:
    """Run the flow run's command as a child, pass SIGTERM and SIGINT on to it, and when it has exited,
    wait for what it left running before this process (the container's) ends.

    With PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR set (prefect-kubernetes always sets it; the job
    template sets `reschedule`), `prefect flow-run execute` answers SIGTERM by rescheduling the run,
    stopping its engine process and exiting, and it gives the engine only 30 s before SIGKILL
    (prefect/runner/_process_manager.py). torchrun, in a session of its own, is then still stopping its
    ranks, which are writing the checkpoint of their last step (up to train.stop_grace_s). Had node 0
    exec'd the command, the container would end with it and kill them mid-save; as the parent and a
    child subreaper, node 0 waits for them, up to `drain_s`, then kills what is left."""
    import subprocess

    child = subprocess.Popen(command)

    def forward(sig, _frame):
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    rc = child.wait()
    _drain(DRAIN_S if drain_s is None else drain_s)
    return rc if rc >= 0 else 128 - rc


def _drain(timeout: float) -> None:
    """Reap every process re-parented to this one until none is left, or kill them after `timeout`."""
    import psutil

    end, told = time.monotonic() + timeout, False
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # nothing left
        if pid:
            continue
        left = psutil.Process().children(recursive=True)
        if not told:
            told = True
            print(f"k8s_node: the flow run's command has ended; waiting up to {timeout:.0f} s for the "
                  f"{len(left)} process(es) it left (a training writing its checkpoint)", flush=True)
        if time.monotonic() >= end:
            print(f"k8s_node: {len(left)} process(es) still running after {timeout:.0f} s: killed", flush=True)
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            end = float("inf")
        time.sleep(0.2)


def run_worker(index: int) -> int:
    """Train as node `index` of the flow run's torchrun; 0 when the run completed."""
    from cloob.run import launch as launch_mod

    run_id = _flow_run_id()
    params, state = flow_run(run_id)
    if state in FINAL:  # node 0 was quicker: nothing to join
        print(f"k8s_node: the flow run is already {state}; nothing to do on node {index}", flush=True)
        return 0 if state == "COMPLETED" else 1
    check_shape(params, _shape())
    nnodes = int(params.get("nnodes", 1))
    if index >= nnodes:
        raise CloobError(f"this is pod {index}, but the flow run trains on {nnodes} node(s)",
                         "the Job's completions must equal the flow run's nnodes")
    endpoint = params.get("rdzv_endpoint") or os.environ.get("CLOOB_RDZV_ENDPOINT")
    if not endpoint:
        raise CloobError("no rendezvous endpoint: neither the rdzv_endpoint parameter nor CLOOB_RDZV_ENDPOINT is set",
                         "use the job template in deploy/k8s/, which sets CLOOB_RDZV_ENDPOINT")
    _wait_for_dns(endpoint, DNS_WAIT_S)

    stop = threading.Event()
    ended: dict[str, str | None] = {"state": None}

    def watch() -> None:  # the flow run ends without us: stop waiting for a rendezvous or training
        while not stop.wait(WATCH_S):
            try:
                _, state = flow_run(run_id)
            except Exception as e:  # a blip of the API is no reason to stop training
                print(f"k8s_node: could not read the flow run's state: {e}", file=sys.stderr)
                continue
            if state in FINAL:
                ended["state"] = state
                stop.set()

    # SIGTERM (the Job deleted, the flow run cancelled): stop torchrun gracefully, as launch does on stop.
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=watch, name="k8s-node-watch", daemon=True).start()
    print(f"k8s_node: node {index} of {nnodes}, rendezvous at {endpoint}, flow run {run_id}", flush=True)
    try:
        result = launch_mod.launch(params["recipe"], list(params.get("overrides") or []),
                                   nproc_per_node=int(params.get("nproc_per_node", 1)), nnodes=nnodes,
                                   node_rank=index, rdzv_endpoint=endpoint, deadline_s=params.get("deadline_s"),
                                   stop=stop, on_line=lambda line: print(line, flush=True))
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)
    if result.cancelled:
        # Stopped because the flow run ended (or the pod was told to stop): node 0's outcome is the run's.
        print(f"k8s_node: stopped, the flow run is {ended['state'] or 'being stopped'}", flush=True)
        return 0 if ended["state"] == "COMPLETED" else 1
    if result.ok:
        return 0
    print(f"k8s_node: torchrun on node {index} ended with exit code {result.returncode}"
          f"{' (deadline)' if result.timed_out else ''}; last lines:\n  " + "\n  ".join(result.log_tail[-20:]),
          file=sys.stderr, flush=True)
    return result.returncode if result.returncode and result.returncode > 0 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        index = _index()
        return run_node0(argv) if index == 0 else run_worker(index)
    except CloobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
