"""The pipeline's promotion step (flows/promote.py) under a real ephemeral Prefect server in a
temporary PREFECT_HOME: the decision logged and published as the `cloob-promotion` artifact, a rerun
that decides nothing, and the reviewer's approval through Prefect's pause with an input form,
resumed from here as the UI does (approve, reject) or left to time out."""

import threading
import time

import numpy as np
import pytest
from prefect import flow

from cloob.registry import Registry
from cloob.registry import promotion as P
from cloob.results.table import read_rows
from flows.promote import PROMOTION_ARTIFACT, promote_models
from flows.summary import SUMMARY_ARTIFACT
from tests.test_promotion import _checkpoint, _evaluated


@flow(name="promote-test")
def promote_flow(registry: str, results: str, candidates: list[str], approval: bool = False,
                 approval_timeout_s: int = 3600) -> list[dict]:
    return promote_models(registry, results, candidates, {"promote_on": ["shapes"]}, approval=approval,
                          approval_timeout_s=approval_timeout_s)


@pytest.fixture
def store(tmp_path):
    """A registry whose champion (old) is beaten by a newer model (new) on shapes, 80% against 40%."""
    reg = Registry(str(tmp_path / "registry"))
    results = str(tmp_path / "results")
    old = reg.register(_checkpoint(tmp_path / "runs" / "old", 1))
    new = reg.register(_checkpoint(tmp_path / "runs" / "new", 2))
    rng = np.random.default_rng(0)
    _evaluated(results, old, "shapes", rng.random(300) < 0.4)
    _evaluated(results, new, "shapes", rng.random(300) < 0.8)
    reg.set_alias("champion", old["id"])
    return reg, results, old, new


def _artifact(key: str = PROMOTION_ARTIFACT) -> str:
    from prefect.artifacts import Artifact

    return Artifact.get(key).data


def _latest_pipeline_run():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["cloob-pipeline"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)[0]


@pytest.mark.slow
def test_a_winner_is_promoted_published_and_a_rerun_decides_nothing(store):
    reg, results, old, new = store
    [d] = promote_flow(reg.uri, results, [new["id"]])
    assert d["promoted"] and reg.aliases()["champion"] == new["id"]
    shown = _artifact()
    assert "promoted to champion" in shown and "| shapes | top1 | 300 |" in shown and "interval [" in shown
    assert promote_flow(reg.uri, results, [new["id"]]) == []
    assert "No new challenger" in _artifact()
    assert [m["entry"] for m in reg.alias_history("champion")] == [old["id"], new["id"]]


def _paused_run(timeout: float = 120):
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for r in client.read_flow_runs():
                if r.state and r.state.is_paused():
                    return r
            time.sleep(0.5)
    raise AssertionError("no flow run paused")


def _run_in_thread(fn, *args, **kwargs) -> dict:
    out = {}

    def target():
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: B036 (the test reads it)
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    out["thread"] = t
    return out


@pytest.mark.slow
@pytest.mark.parametrize("approve", [True, False])
def test_a_reviewer_approves_or_rejects_in_the_pause_form(store, approve):
    from prefect import get_client

    reg, results, old, new = store
    run = _run_in_thread(promote_flow, reg.uri, results, [new["id"]], approval=True)
    paused = _paused_run()
    assert reg.aliases()["champion"] == old["id"]  # nothing moves while the reviewer thinks
    with get_client(sync_client=True) as client:
        client.resume_flow_run(paused.id, run_input={"approve": approve, "comment": "checked the numbers"})
    run["thread"].join(120)
    assert "error" not in run, run.get("error")
    [d] = run["result"]
    assert d["approval"] == {"outcome": "approved" if approve else "rejected", "comment": "checked the numbers"}
    assert reg.aliases()["champion"] == (new["id"] if approve else old["id"])
    if not approve:
        assert reg.aliases()["challenger"] == new["id"]
        move = reg.alias_history("challenger")[-1]
        assert move["decision"]["reason"] == "rejected by the reviewer: checked the numbers"


@pytest.mark.slow
def test_no_answer_before_the_timeout_promotes_nothing_and_asks_again_next_time(store):
    from prefect import get_client

    reg, results, old, new = store
    with pytest.raises(Exception, match="no reviewer answered within 3 s"):
        promote_flow(reg.uri, results, [new["id"]], approval=True, approval_timeout_s=3)
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:  # this test's run (the server may hold other modules' runs)
        [run] = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["promote-test"])),
                                      sort=FlowRunSort.START_TIME_DESC, limit=1)
    state = run.state
    assert state.is_failed()
    print("the flow run ends", state.type.value, repr(state.message))
    # Prefect's own outcome of a pause that timed out: the run cannot resume, and ends Failed.
    assert state.message.endswith("never resumed.")
    assert reg.aliases()["champion"] == old["id"] and reg.aliases()["challenger"] == new["id"]
    assert reg.alias_history("challenger")[-1]["decision"]["approval"]["outcome"] == "timed out"
    assert P.decided_before(reg, new["id"]) is None  # the next run asks again


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_pipeline_sets_the_champion_promotes_nothing_on_a_rerun_and_keeps_it_against_a_worse_model(tmp_path):
    """Run 1 trains (the demo's CLOOB and CLIP, 30 steps), evaluates, and the first model becomes
    champion, the second decided against it by the numbers; run 2 on unchanged data decides nothing;
    run 3 trains a model made worse on purpose (2 steps) and it gets `challenger`, the champion stays.
    (No loader workers: this is not a test of them.)"""
    from flows.demo import demo_parameters
    from flows.pipeline import pipeline

    params = demo_parameters(str(tmp_path / "store"), steps=30, samples=1024)
    params["overrides"] = [*params["overrides"], "data.workers=0"]
    reg = Registry(str(tmp_path / "store" / "registry"))
    first = pipeline(**params, require_significant=False)
    ids = [e["id"] for e in reg.entries()]
    assert [p["challenger"] for p in first["promotion"]] == ids and first["promotion"][0]["reason"] == "no champion yet"
    history = reg.alias_history("champion")
    second = history[-1]["decision"] if len(history) == 2 else reg.alias_history("challenger")[-1]["decision"]
    rows = {(r["checkpoint_id"], r["dataset"]): r["main_value"] for r in read_rows(params["store"] + "/results").to_pylist()}
    for s in second["sets"]:  # both models' numbers per set are the table's
        assert (s["challenger"], s["champion"]) == (rows[ids[1], s["dataset"]], rows[ids[0], s["dataset"]])
    assert second["interval"] is not None and second["rule"]["promote_on"] == ["colors", "shapes"]
    champion = reg.aliases()["champion"]
    assert champion == (ids[1] if second["gain"] > 0 else ids[0])
    print("run 1:", [(p["promoted"], p["reason"]) for p in first["promotion"]])
    # what an operator sees: the run named and tagged by its data version, and a summary artifact
    run = _latest_pipeline_run()
    assert run.name == "cloob-pipeline: demo-v1" and {"data:demo", "data-version:v1"} <= set(run.tags)
    summary = _artifact(SUMMARY_ARTIFACT)
    assert "| demo | v1 | 1024 |" in summary and summary.count("trained from scratch") == 2
    assert "2 evaluated" not in summary and "4 evaluated, 0 failed" in summary and "promoted to champion" in summary

    again = pipeline(**params)
    assert again["promotion"] == [] and reg.aliases()["champion"] == champion
    assert len(reg.alias_history("champion")) == len(history)
    assert "No new challenger" in _artifact()
    assert _artifact(SUMMARY_ARTIFACT).endswith("No change since version 1 of demo (1024 images, content hash "
                                                 f"{first['data'][0]['content_hash'][:12]}): nothing to do.")
    assert _latest_pipeline_run().name == "cloob-pipeline: demo-v1"

    worse = pipeline(**{**params, "recipes": params["recipes"][:1], "overrides": ["train.steps=2", "data.workers=0"]},
                     require_significant=True)
    [d] = worse["promotion"]
    print("run 3:", d)
    assert not d["promoted"] and reg.aliases()["champion"] == champion
    assert reg.aliases()["challenger"] == d["challenger"] == reg.aliases()["latest"]
