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
