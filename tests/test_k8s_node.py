"""flows.k8s_node, what each pod of the Kubernetes Job runs: pod 0 execs the flow run's command, the
others join its torchrun as their node (checked against the flow run's parameters and the Job's
shape) and stop when the flow run ends without them; and one real two-node torchrun on this machine."""

import os
import threading
import uuid

import pytest

from tests.prefect_stack import free_port


class _Result:
    def __init__(self, returncode=0, cancelled=False):
        self.returncode, self.cancelled, self.timed_out = returncode, cancelled, False
        self.log_tail = ["last line"]

    @property
    def ok(self):
        return self.returncode == 0 and not self.cancelled


@pytest.fixture
def node(monkeypatch):
    """flows.k8s_node with the Prefect API and cloob.run.launch.launch replaced by recorders."""
    import cloob.run.launch
    import flows.k8s_node as k8s_node

    state = {"params": {"recipe": "tiny", "overrides": ["train.steps=5"], "nproc_per_node": 4, "nnodes": 3,
                        "rdzv_endpoint": None, "deadline_s": None},
             "states": ["RUNNING"], "launches": [], "result": _Result(), "lookups": []}

    def flow_run(run_id):
        state["lookups"].append(run_id)
        return dict(state["params"]), state["states"][min(len(state["lookups"]) - 1, len(state["states"]) - 1)]

    def launch(recipe, overrides, **kw):
        state["launches"].append((recipe, overrides, kw))
        return state["result"]() if callable(state["result"]) else state["result"]

    monkeypatch.setattr(k8s_node, "flow_run", flow_run)
    monkeypatch.setattr(cloob.run.launch, "launch", launch)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(uuid.uuid4()))
    monkeypatch.setenv("CLOOB_RDZV_ENDPOINT", "localhost:29400")  # resolves: no wait for DNS
    monkeypatch.setenv("CLOOB_K8S_SHAPE", "3x4")
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    state["module"] = k8s_node
    return state


def test_k8s_node_worker_index_launches_torchrun_as_that_node(node, monkeypatch, capsys):
    from cloob.run.launch import build_command

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert node["module"].main(["prefect", "flow-run", "execute"]) == 0
    ((recipe, overrides, kw),) = node["launches"]
    assert (recipe, overrides) == ("tiny", ["train.steps=5"])
    assert (kw["nproc_per_node"], kw["nnodes"], kw["node_rank"], kw["rdzv_endpoint"]) == (4, 3, 2, "localhost:29400")
    assert node["lookups"] == [os.environ["PREFECT__FLOW_RUN_ID"]]  # its parameters, from the API
    cmd = build_command(recipe, overrides, nproc_per_node=4, nnodes=3, node_rank=2, rdzv_endpoint=kw["rdzv_endpoint"])
    assert cmd[cmd.index("--node_rank") + 1] == "2" and cmd[cmd.index("--rdzv_endpoint") + 1] == "localhost:29400"
    # Its status is the exit code: a failed torchrun fails the pod, and with it the Job.
    node["launches"].clear()
    node["result"] = _Result(returncode=3)
    assert node["module"].main([]) == 3


def test_k8s_node_index_0_execs_the_flow_run_command(node, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execvp", lambda f, args: calls.append((f, list(args))))
    assert node["module"].main(["prefect", "flow-run", "execute"]) == 127  # only reached with execvp replaced
    assert calls == [("prefect", ["prefect", "flow-run", "execute"])] and node["launches"] == []
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    node["params"]["nnodes"] = 2  # the Job has 3 pods: the rendezvous would never complete
    assert node["module"].main(["prefect", "flow-run", "execute"]) == 2
    assert len(calls) == 1


def test_k8s_node_refuses_a_job_that_does_not_match_the_flow_run(node, monkeypatch, capsys):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    node["params"]["nnodes"] = 2
    assert node["module"].main([]) == 2
    err = capsys.readouterr().err
    assert "nnodes=2" in err and "3 pods" in err and "fix: " in err and node["launches"] == []
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID")
    assert node["module"].main([]) == 2 and "PREFECT__FLOW_RUN_ID" in capsys.readouterr().err


def test_k8s_node_stops_when_the_flow_run_ends_without_it(node, monkeypatch):
    """Node 0 found the run trained and skipped it (or failed first): the others stop waiting."""
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    node["states"] = ["COMPLETED"]
    assert node["module"].main([]) == 0 and node["launches"] == []  # already over: nothing to join
    node["lookups"].clear()
    node["states"] = ["RUNNING", "RUNNING", "FAILED"]
    monkeypatch.setattr(node["module"], "WATCH_S", 0.05)

    def wait_for_stop():
        (_, _, kw), = node["launches"]
        assert kw["stop"].wait(10), "the watcher never stopped the node"
        return _Result(returncode=-15, cancelled=True)

    node["result"] = wait_for_stop
    assert node["module"].main([]) == 1  # the run failed: so does this node


@pytest.mark.slow
def test_k8s_node_joins_a_real_two_node_torchrun(monkeypatch, tmp_path, capsys, make_shards):
    """Pod 1 through flows.k8s_node and node 0 through cloob.run.launch (what the cloob-train flow runs),
    both on this machine with a c10d rendezvous on 127.0.0.1: one run with a global batch of two nodes."""
    import cloob.run.launch
    import flows.k8s_node as k8s_node

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = [f"data.train={make_shards(80, 40, seed=3)}", f"train.output={tmp_path / 'out'}", "train.batch_size=8",
                 "train.steps=3", "train.checkpoint_every=3", "data.workers=1", "data.shuffle_buffer=40",
                 "schedule.warmup_steps=1"]
    endpoint = f"127.0.0.1:{free_port()}"
    params = {"recipe": "tiny", "overrides": overrides, "nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": None}
    monkeypatch.setattr(k8s_node, "flow_run", lambda run_id: (params, "RUNNING"))
    for k, v in {"JOB_COMPLETION_INDEX": "1", "PREFECT__FLOW_RUN_ID": str(uuid.uuid4()),
                 "CLOOB_RDZV_ENDPOINT": endpoint, "CLOOB_K8S_SHAPE": "2x1"}.items():
        monkeypatch.setenv(k, v)
    node0: dict = {}
    lines: list[str] = []
    t = threading.Thread(target=lambda: node0.setdefault("result", cloob.run.launch.launch(
        "tiny", overrides, nproc_per_node=1, nnodes=2, node_rank=0, rdzv_endpoint=endpoint, on_line=lines.append,
        deadline_s=240)))
    t.start()
    try:
        assert k8s_node.main([]) == 0
    finally:
        t.join(timeout=240)
    r = node0["result"]
    assert r.ok, r.log_tail[-20:]
    assert r.checkpoint and r.checkpoint.endswith("step_00000003")
    # The trainer's first line (from global rank 0, on either node): both nodes' ranks are in one run.
    text = "\n".join(lines) + capsys.readouterr().out
    assert "2 x 8 = global batch 16" in text, text[-3000:]
