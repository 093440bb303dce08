"""The weekly retrain through the `cloob` commands, without Prefect (issue 26): what an operator's
script runs each week against a url/caption table served on 127.0.0.1 that grows and loses rows.
prepare -> train (init_from=champion) -> registry register -> evaluate -> registry promote; the same
commands on unchanged data request nothing and train nothing; after new rows, only those are
requested, the new version trains warm-started from the champion, and promotion goes by the numbers."""

from __future__ import annotations

import pytest
import yaml

from cloob.cli import main as cli
from cloob.registry import Registry
from cloob.results.table import read_rows
from tests.test_versions import fetched, rows, write

TRAIN = ["train.steps=8", "train.batch_size=16", "data.workers=0", "data.shuffle_buffer=32",
         "schedule.warmup_steps=2", "train.progress=false", "train.init_from=champion"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_weekly_retrain_through_the_cloob_commands(tmp_path, image_server, capsys):
    store = tmp_path / "store"
    ds = store / "datasets" / "weekly"
    table = write(tmp_path / "weekly.tsv", rows(image_server.url, range(64)))
    spec = tmp_path / "weekly.yaml"
    spec.write_text(yaml.safe_dump({"name": "weekly", "source": {"kind": "table", "path": str(table)},
                                    "download": {"image_size": 32, "shard_size": 32, "processes": 1, "threads": 4,
                                                 "timeout": 5, "deadline": 20, "retries": 0}}))
    reg = Registry(str(store / "registry"))
    assert cli(["prepare-downstream", "shapes", "--out", str(store / "downstream")]) == 0

    def week() -> str:
        """The operator's script; what it printed."""
        capsys.readouterr()
        assert cli(["prepare", str(spec), "--out", str(ds), "--no-progress"]) == 0
        assert cli(["train", "tiny", f"data.train={ds}", f"train.output={store}", *TRAIN]) == 0
        for run in sorted((store / "runs").iterdir()):
            assert cli(["registry", "register", str(run), "--store", str(store)]) == 0
        assert cli(["evaluate", "latest", "--store", str(store), "--datasets", "shapes", "--no-progress",
                    "--workers", "0"]) == 0
        assert cli(["registry", "promote", "latest", "--store", str(store)]) == 0
        out = capsys.readouterr()
        return out.out + out.err

    said = week()  # week 1: every row; from scratch, as there is no champion yet
    assert fetched(image_server) == list(range(64))
    assert "no champion yet, so this run trains from scratch" in said
    [first] = reg.entries()
    assert first["data_version"] == "weekly-v1" and first["parent"] is None
    assert reg.aliases()["champion"] == first["id"]

    said = week()  # week 2, unchanged: no request, nothing trained, nothing decided
    assert fetched(image_server) == []
    assert "no new rows since version 1" in said and "nothing to train" in said
    assert len(reg.entries()) == 1 and len(reg.alias_history("champion")) == 1

    write(table, rows(image_server.url, [*range(3, 64), *range(64, 96)]))  # 32 new rows, 3 taken down
    said = week()
    assert fetched(image_server) == list(range(64, 96))
    second = next(e for e in reg.entries() if e["id"] != first["id"])
    assert second["data_version"] == "weekly-v2" and second["parent"]["id"] == first["id"]
    assert "warm start from champion" in said
    top1 = {r["checkpoint_id"]: r["main_value"] for r in read_rows(str(store / "results")).to_pylist()}
    won = top1[second["id"]] > top1[first["id"]]
    assert reg.aliases()["champion"] == (second["id"] if won else first["id"])
    assert ("promoted to champion" if won else "not promoted") in said
