"""Retraining through the pipeline under a real ephemeral Prefect server (issue 26): a run is keyed and
named by its data version, a warm start (init_from) is a new run whose registry entry names its parent,
and a recipe entry's override that contradicts the pipeline's overrides fails before anything trains."""

import posixpath

import pytest

from cloob.errors import CloobError
from cloob.registry import Registry


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_pipeline_keys_runs_by_data_warm_starts_and_refuses_contradictions(tmp_path):
    from flows.demo import demo_parameters
    from flows.pipeline import pipeline

    # Nothing here depends on how well the model learns: a few small steps, no loader workers.
    params = demo_parameters(str(tmp_path / "store"), steps=8, samples=256)
    params.update(recipes=params["recipes"][:1], downstream=["shapes"],
                  overrides=[*params["overrides"], "train.batch_size=16", "data.workers=0"])
    reg = Registry(str(tmp_path / "store" / "registry"))

    with pytest.raises(CloobError, match="train.steps is 8 in the pipeline's overrides"):
        pipeline(**{**params, "recipes": [f"{params['recipes'][0]} train.steps=30"]})
    assert not (tmp_path / "store").exists()  # refused before anything was prepared or trained

    first = pipeline(**params)
    [run] = first["runs"]
    assert "-demo-v1-" in run["run_dir"]
    [parent] = reg.entries()
    assert parent["data_version"] == "demo-v1" and parent["parent"] is None

    # A warm start from this recipe's own model on the same data: the data has not changed, so nothing
    # trains (a schedule deployed with init_from=champion would otherwise train again every week).
    same = pipeline(**params, init_from="latest")
    assert same["runs"][0]["run_dir"] == run["run_dir"] and same["runs"][0]["skipped"] and len(reg.entries()) == 1

    # Other data (here a changed spec: a new dataset beside the old one): a warm start, a new run.
    grown = {**params, "spec_overrides": ["source.samples=320"]}
    warm = pipeline(**grown, init_from="latest")
    [child_run] = warm["runs"]
    assert child_run["run_dir"] != run["run_dir"] and not child_run.get("skipped")
    child = next(e for e in reg.entries() if e["id"] != parent["id"])
    assert child["parent"]["id"] == parent["id"] and child["parent"]["ref"] == "latest"
    beside = posixpath.basename(warm["data"][0]["uri"])  # demo-<spec hash>: named apart from demo-v1
    assert beside.startswith("demo-") and child["data_version"] == f"{beside}-v1"
    assert f"-{beside}-v1-" in child_run["run_dir"]

    again = pipeline(**grown, init_from=parent["id"])  # the same parent, by its id: the same run
    assert again["runs"][0]["run_dir"] == child_run["run_dir"] and len(reg.entries()) == 2
