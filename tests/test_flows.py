"""The Prefect flows under a real ephemeral Prefect server in a temporary PREFECT_HOME. The whole
pipeline end to end, its kill and rerun, and a rerun that skips everything: tests/test_demo.py."""

import os
import tempfile

# Before Prefect is imported: its settings are read once.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
# Prefect's 20 s for its temporary server to start is too little on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cloob.data import synthetic  # noqa: E402
from cloob.results.table import read_rows  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_random_checkpoint) -> str:
    return make_random_checkpoint(tmp_path_factory.mktemp("run"), seed=3, run_name="f").url


@pytest.mark.slow
def test_evaluate_flow_a_broken_set_fails_only_its_task_and_reruns_are_cached(tmp_path, checkpoint):
    from flows.pipeline import evaluate_flow

    good = tmp_path / "shapes"
    synthetic.write_class_folders(good, per_class=3, image_size=32)
    broken = tmp_path / "broken"
    synthetic.write_class_folders(broken, per_class=2, image_size=32)
    (broken / "red circle").rename(broken / "crimson circle")  # no longer matches the spec
    spec = Path(__file__).parents[1] / "data_specs" / "downstream" / "shapes.yaml"
    broken_spec = tmp_path / "shapes_broken.yaml"
    broken_spec.write_text(spec.read_text().replace("name: shapes", "name: shapes_broken"))
    store = tmp_path / "store"
    settings = {"batch_size": 16, "workers": 0}
    out = evaluate_flow([checkpoint], {"shapes": str(good), str(broken_spec): str(broken)}, str(store), settings)
    assert out["evaluated"] == 1 and out["failed"] == 1
    rows = read_rows(str(store / "results")).to_pylist()
    assert [r["dataset"] for r in rows] == ["shapes"] and rows[0]["n_images"] == 54
    assert Path(out["report"]).exists()
    # The table artifact shows percentages, rounded as the printed table is, not raw fractions.
    import json

    from prefect.artifacts import Artifact

    shown = json.loads(Artifact.get("cloob-results").data)
    assert [(a["dataset"], a["top1"], a["top5"]) for a in shown] == \
        [("shapes", f"{100 * rows[0]['top1']:.1f}%", f"{100 * rows[0]['top5']:.1f}%")]
    # A second run finds the row: the task is cached (no new row), the broken set fails again.
    again = evaluate_flow([checkpoint], {"shapes": str(good)}, str(store), settings)
    assert again["evaluated"] == 1 and len(read_rows(str(store / "results"), latest=False)) == 1


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))


@pytest.mark.slow
def test_evaluate_flow_takes_set_names_and_registry_aliases_and_names_its_tasks(tmp_path, checkpoint):
    """What `prefect deployment run evaluate-checkpoints/cpu -p checkpoints='["candidate"]' -p
    datasets='["shapes"]'` does: the set by its name in the store, the checkpoint by its alias. The
    task runs say checkpoint, step and set; a rerun's task ends Skipped, saying the content key."""
    from cloob.data.downstream.prepare import prepare_downstream
    from cloob.registry import Registry
    from flows.names import checkpoint_label
    from flows.pipeline import evaluate_flow

    store = tmp_path / "store"
    prepare_downstream("shapes", str(store / "downstream"), progress=False)
    Registry(str(store / "registry")).register(checkpoint, aliases=["candidate"])
    settings = {"batch_size": 64, "workers": 0, "limit": 16}
    state = evaluate_flow(["candidate"], ["shapes"], str(store), settings, publish=False, return_state=True)
    assert state.is_completed(), state.message
    rows = read_rows(str(store / "results")).to_pylist()
    assert [(r["dataset"], r["dataset_uri"], r["checkpoint_uri"].rstrip("/")) for r in rows] == \
        [("shapes", str(store / "downstream" / "shapes"), checkpoint.rstrip("/"))]
    label = checkpoint_label(checkpoint)  # <run folder>-step<N>
    assert label == f"{Path(checkpoint).parents[1].name}-step{rows[0]['step']}"
    (first,) = _task_runs(state.state_details.flow_run_id)
    assert (first.name, first.state.name) == (f"evaluate-{label}-on-shapes", "Completed")

    again = evaluate_flow(["candidate"], ["shapes"], str(store), settings, publish=False, return_state=True)
    (second,) = _task_runs(again.state_details.flow_run_id)
    assert (second.name, second.state.name) == (first.name, "Skipped")
    assert f"content key {rows[0]['row_uuid'][:12]}" in second.state.message
    # A name that is neither a folder nor an alias is one clear error.
    with pytest.raises(Exception, match="neither a checkpoint folder nor known to the registry"):
        evaluate_flow(["nonesuch"], ["shapes"], str(store), settings, publish=False)
