"""The weekly retrain as an operator's Sunday runs it: `cloob deploy` of a url/caption table spec,
then cloob-pipeline/retrain run as its schedule runs it, on a real local Prefect server with process
workers on both pools (conftest's gpu_workers, and a CPU worker here), while the table grows."""

import time
from pathlib import Path

import pytest

from tests.prefect_stack import FAKE_SECRET, GPU_TEST_POOL, Worker

CPU_TEST_POOL = "test-cpu-pool"


def _table(path: Path, base: str, ids) -> None:
    """A url/caption table of demo pictures served by `base`; each caption names its row (`row 7: ...`)."""
    from cloob.prepare.demo_server import render

    path.write_text("url\tcaption\n" + "".join(f"{base}/3/64/1/{i}.jpg\trow {i}: {render(3, 64, 1, i)[1]}\n"
                                               for i in ids))


def _fetched(server) -> list[int]:
    """The rows the image server was asked for since the last call."""
    out = sorted(int(p.rsplit("/", 1)[1].split(".")[0]) for p in server.httpd.requests)
    server.httpd.requests.clear()
    return out


def _run_deployment(client, name: str, logs: dict, parameters: dict | None = None, timeout: float = 600):
    """A run of deployment `name` as its schedule (no parameters) or a person (`parameters`) starts
    it, taken by the workers; its final flow run."""
    from prefect.states import StateType

    d = client.read_deployment_by_name(name)
    run = client.create_flow_run_from_deployment(d.id, parameters=parameters or {})
    deadline = time.monotonic() + timeout
    while (r := client.read_flow_run(run.id)).state.type not in (StateType.COMPLETED, StateType.FAILED,
                                                                 StateType.CRASHED, StateType.CANCELLED):
        assert time.monotonic() < deadline, "".join(p.read_text()[-3000:] for p in logs.values())
        time.sleep(1)
    assert r.state.type == StateType.COMPLETED, (r.state.message, "".join(p.read_text()[-4000:] for p in logs.values()))
    return r


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_weekly_retrain_on_both_pools_fetches_new_rows_warm_starts_and_promotes_by_the_numbers(
        gpu_workers, tmp_path, image_server, drain_prefect_clients):
    """What an operator's Sunday looks like, on a real server with process workers on both pools:
    `cloob deploy` of a url/caption table spec (warm starts from the champion), then the retrain
    deployment run as its schedule runs it, while the table on 127.0.0.1 grows.
    Run 1 prepares, trains from scratch (no champion yet) and sets the champion; run 2 on unchanged data
    requests nothing, trains nothing, promotes nothing; run 3, after 32 rows were appended and 4 taken
    down, requests only the new rows, makes version 2, trains warm-started from the champion, evaluates
    and decides by the numbers; a manual run of a model made worse on purpose is not promoted, and the
    schedule's next run (the deployment's own parameters) still works."""
    import torch
    import yaml as _yaml
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cloob.data.shards import list_shards
    from cloob.data.stream import ShardStream
    from cloob.registry import Registry
    from cloob.results.table import read_rows
    from flows.cli import main as cloob_main
    from flows.summary import SUMMARY_ARTIFACT

    url = gpu_workers["url"]
    store = tmp_path / "store"
    table = tmp_path / "weekly.tsv"
    _table(table, image_server.url, range(96))
    spec = tmp_path / "weekly.yaml"
    spec.write_text(_yaml.safe_dump({
        "name": "weekly", "source": {"kind": "table", "path": str(table)},
        "download": {"image_size": 64, "shard_size": 32, "processes": 1, "threads": 1, "timeout": 5, "deadline": 20,
                     "retries": 0}}))
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert cloob_main(["deploy", "--store", str(store), "--spec", str(spec), "--recipe", "tiny", "--downstream", "shapes",
                            "--cpu-pool", CPU_TEST_POOL, "--gpu-pool", GPU_TEST_POOL, "--no-schedule",
                            "--init-from", "champion", "--worker-wait-s", "300",
                            "--override", "train.steps=30", "--override", "train.batch_size=16",
                            "--override", "data.workers=0", "--override", "data.shuffle_buffer=32",
                            "--override", "schedule.warmup_steps=2"]) == 0
    cpu = Worker(url, CPU_TEST_POOL, "cpu-worker", tmp_path, limit=None, AWS_ACCESS_KEY_ID="fake-key-id",
                 AWS_SECRET_ACCESS_KEY=FAKE_SECRET)
    logs = dict(gpu_workers["logs"], cpu=cpu.log_path)
    reg = Registry(str(store / "registry"))

    def summary(client) -> str:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_ARTIFACT])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)[0].data

    try:
        with SyncPrefectClient(api=url) as client:
            # Run 1: all 96 rows fetched; from scratch (init_from=champion, none yet); the first champion.
            run1 = _run_deployment(client, "cloob-pipeline/retrain", logs)
            assert _fetched(image_server) == list(range(96))
            [first] = reg.entries()
            assert first["data_version"] == "weekly-v1" and first["parent"] is None
            assert reg.aliases()["champion"] == first["id"]
            assert run1.name == "cloob-pipeline: weekly-v1" and "data-version:v1" in run1.tags
            assert "trained from scratch" in summary(client) and "promoted to champion (no champion yet)" in summary(client)

            # Run 2, unchanged: not one request, nothing trained or promoted.
            _run_deployment(client, "cloob-pipeline/retrain", logs)
            assert _fetched(image_server) == []
            assert len(reg.entries()) == 1 and len(reg.alias_history("champion")) == 1
            assert "No change since version 1 of weekly" in summary(client)

            # The week's delta: 32 rows appended, 4 taken down.
            _table(table, image_server.url, [*range(4, 96), *range(96, 128)])
            run3 = _run_deployment(client, "cloob-pipeline/retrain", logs)
            assert _fetched(image_server) == list(range(96, 128))  # only the new rows
            assert run3.name == "cloob-pipeline: weekly-v2-plus32" and "data-version:v2" in run3.tags
            second = next(e for e in reg.entries() if e["id"] != first["id"])
            assert second["data_version"] == "weekly-v2" and second["parent"]["id"] == first["id"]
            text = summary(client)
            assert "| weekly | v2 | " in text and "warm-started from champion" in text, text
            # Decided on the table's numbers: champion moves only if the mean gain is positive.
            decision = (reg.alias_history("champion") + reg.alias_history("challenger"))[-1]["decision"]
            rows = {r["checkpoint_id"]: r["main_value"] for r in read_rows(str(store / "results")).to_pylist()}
            assert [(s["challenger"], s["champion"]) for s in decision["sets"]] == [(rows[second["id"]],
                                                                                     rows[first["id"]])]
            won = rows[second["id"]] > rows[first["id"]]
            assert reg.aliases()["champion"] == (second["id"] if won else first["id"])
            champion = reg.aliases()["champion"]
            # The rows taken down are not read in training on version 2.
            recipe = _yaml.safe_load((Path(second["run_dir"]) / "recipe.yaml").read_text())
            s = list_shards(f"{store / 'datasets' / 'weekly'}@v2")
            assert (recipe["data"]["version"], recipe["data"]["content_hash"]) == ("weekly-v2", s.content_hash)
            stream = ShardStream(s.urls, batch_size=1, image_transform=lambda im: torch.zeros(1), tokenizer=lambda t: t, seed=0,
                                 resampled=False, shuffle_buffer=1, exclude_keys=s.exclude_keys,
                                 expected_counts=dict(zip(s.urls, s.counts)))
            read = []
            for b in stream:  # one pass of version 2 (the stream goes on into the next)
                read.append(int(b["text"][0].split(":")[0][4:]))
                if len(read) == s.num_samples:
                    break
            assert sorted(read) == list(range(4, 128))

            # A person's run of a model made worse on purpose (1 step from scratch), with a rule that
            # wants a real gain (the interval's lower end 2 points up): not promoted, the champion stays.
            worse = _run_deployment(client, "cloob-pipeline/retrain", logs, {
                "overrides": ["train.steps=1", "train.batch_size=16", "data.workers=0", "data.shuffle_buffer=32",
                              "schedule.warmup_steps=1"], "init_from": None, "require_significant": True, "min_gain": 0.02})
            assert worse.state.is_completed()
            third = reg.resolve("latest")
            assert third["id"] not in (first["id"], second["id"]) and third["parent"] is None
            assert reg.aliases()["champion"] == champion and reg.aliases()["challenger"] == third["id"]
            assert "not promoted" in summary(client)
            # ... and the schedule's next run, with the deployment's own parameters, is a quiet no-op.
            _run_deployment(client, "cloob-pipeline/retrain", logs)
            assert _fetched(image_server) == [] and reg.aliases()["champion"] == champion
            assert "No change since version 2 of weekly" in summary(client)
    finally:
        cpu.stop()
