"""The Prefect flows under a real ephemeral Prefect server in a temporary PREFECT_HOME. The whole
pipeline end to end, its kill and rerun, and a rerun that skips everything: tests/test_demo.py."""

import os
from pathlib import Path

import pytest

from cloob.data import synthetic
from cloob.results.table import read_rows


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
    from cloob.evaluate.sets.prepare import prepare_downstream
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


STUDY = {"name": "tiny-study", "data": "demo", "data_overrides": ["source.samples=32", "download.shard_size=16"],
         "recipe": "tiny", "overrides": ["train.steps=4", "train.batch_size=8", "data.workers=0", "data.shuffle_buffer=16",
                                         "schedule.warmup_steps=1"],
         "methods": ["cloob", "clip"], "seeds": 2, "downstream": ["shapes"], "evaluate": {"every": 2}}


@pytest.mark.slow
def test_a_study_killed_mid_way_resumes_and_its_report_is_the_tables_numbers(tmp_path):
    """2 methods x 2 seeds x 2 evaluation steps on 32 demo pictures. `cloob study` is killed once its
    first cell has trained; the rerun trains and evaluates nothing twice; the report's means, stds and
    test are those of the results table; the diagnostics have one point per (run, step, set)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from cloob.study.stats import welch
    from flows.study import study_flow

    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(STUDY))
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "study", str(spec), "--store", str(store)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(store.glob("runs/*/checkpoints/step_*4/meta.json"))) < 1:  # the first cell is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:] if proc.poll() else ""
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in store.glob("runs/*/checkpoints/*/open_clip_pytorch_model.bin")}

    out = study_flow(str(spec), str(store), eval_settings={"batch_size": 64, "workers": 0, "limit": 32})
    assert len(out["runs"]) == 4 and out["failed"] == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # the killed run's finished work is kept
    rows = read_rows(str(store / "results"), latest=False).to_pylist()
    assert sorted((r["run_id"], r["step"]) for r in rows) == sorted((run, s) for run in out["runs"] for s in (2, 4))

    again = study_flow(str(spec), str(store), eval_settings={"batch_size": 64, "workers": 0, "limit": 32})
    assert again["runs"] == out["runs"] and len(read_rows(str(store / "results"), latest=False)) == len(rows)

    data = json.loads((store / "studies" / "tiny-study" / "study.json").read_text())
    for method in ("cloob", "clip"):
        values = sorted(r["main_value"] for r in rows if r["step"] == 4 and r["method"] == method)
        (final,) = [f for f in data["final"] if f["group"] == method]
        assert sorted(final["values"]) == pytest.approx(values) and final["n"] == 2
        assert final["mean"] == pytest.approx(sum(values) / 2)
    cl, cp = ([r["main_value"] for r in rows if r["step"] == 4 and r["method"] == m] for m in ("cloob", "clip"))
    (test,) = data["tests"]
    expect = welch(cl, cp)
    assert test["test"] == "Welch's two-sided t-test" and (test["p"] == pytest.approx(expect.p) if expect.p else
                                                          test["reason"] == expect.reason)
    assert sorted((d["run_id"], d["step"], d["dataset"]) for d in data["diagnostics"]) == \
        sorted((r["run_id"], r["step"], r["dataset"]) for r in rows)
    for name in ("study.md", "study.png", "diagnostics.png"):
        assert (store / "studies" / "tiny-study" / name).stat().st_size > 0
    assert "Welch's two-sided t-test" in (store / "studies" / "tiny-study" / "study.md").read_text()
