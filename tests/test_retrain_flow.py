"""Retraining through the pipeline under a real ephemeral Prefect server (issue 26): a run is keyed and
named by its data version, a warm start (init_from) is a new run whose registry entry names its parent,
and a recipe entry's override that contradicts the pipeline's overrides fails before anything trains."""

import os
import tempfile

# Before Prefect is imported: its settings are read once.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from cloob.errors import CloobError  # noqa: E402
from cloob.registry import Registry  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_pipeline_keys_runs_by_data_warm_starts_and_refuses_contradictions(tmp_path):
    from flows.demo import demo_parameters
    from flows.pipeline import pipeline

    params = demo_parameters(str(tmp_path / "store"), steps=20, samples=256)
    params.update(recipes=params["recipes"][:1], downstream=["shapes"])
    reg = Registry(str(tmp_path / "store" / "registry"))

    with pytest.raises(CloobError, match="train.steps is 20 in the pipeline's overrides"):
        pipeline(**{**params, "recipes": [f"{params['recipes'][0]} train.steps=30"]})
    assert not (tmp_path / "store").exists()  # refused before anything was prepared or trained

    first = pipeline(**params)
    [run] = first["runs"]
    assert "-demo-v1-" in run["run_dir"]
    [parent] = reg.entries()
    assert parent["data_version"] == "demo-v1" and parent["parent"] is None

    warm = pipeline(**params, init_from="latest")
    [child_run] = warm["runs"]
    assert child_run["run_dir"] != run["run_dir"]  # the parent's weights are in the key
    child = next(e for e in reg.entries() if e["id"] != parent["id"])
    assert child["parent"]["id"] == parent["id"] and child["parent"]["ref"] == "latest"
    assert child["data_version"] == "demo-v1"

    again = pipeline(**params, init_from=parent["id"])  # the same parent, by its id: the same run
    assert again["runs"][0]["run_dir"] == child_run["run_dir"] and len(reg.entries()) == 2
