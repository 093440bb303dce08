"""Runs keyed by their data and warm starts (issue 26): the run's key and name follow the content hash
of the data version it trains on and the weights it starts from; runs made before keep resuming;
retention and logging fields stay out of the key; a name never claims an override that did not run."""

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import child_env

from cloob.config import LOSS_EXECUTION_FIELDS, RUNTIME_FIELDS, load_recipe
from cloob.data import synthetic
from cloob.errors import CloobError
from cloob.run.state import data_identity, identify, trained
from cloob.train.checkpoint import CheckpointStore

TINY_HASH = "fa244323c967a36397bb622451271c7976555acccc47dee263e114eff79e5352"


def _old_hash(r) -> str:
    """Recipe.content_hash as it was before this change, written out here."""
    d = r.model_dump(mode="json")
    for k in RUNTIME_FIELDS:
        d["train"].pop(k)
    for k in LOSS_EXECUTION_FIELDS:
        d["loss"].pop(k)
    for k in ("content_hash", "version"):
        d["data"].pop(k)
    if d["data"]["decoder"] is None:  # unset: the recipe as it was before data.decoder existed
        d["data"].pop("decoder")
    for k in ("init_from", "init_checkpoint", "init_sha256", "init_entry"):
        d["train"].pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _dataset(root: Path, content_hash: str, *, updated_at: str | None = None, version=None) -> Path:
    """A prepared dataset folder: shards and the manifest cloob prepare writes (the fields read here)."""
    if not any(root.glob("*.tar")):
        synthetic.write_shards(root, 96, shard_size=48, image_size=32, seed=1)
    shards = [{"shard": p.name, "successes": 48} for p in sorted(root.glob("*.tar"))]
    manifest = {"name": "mytable", "spec": {"name": "mytable"}, "content_hash": content_hash, "shards": shards,
                "updated_at": updated_at or datetime.now(UTC).isoformat(timespec="seconds")}
    (root / "_cloob").mkdir(exist_ok=True)
    if version is not None:  # cloob.prepare.versions' layout: vN.json, v1.json the first manifest as it was
        (root / "_cloob" / "versions").mkdir(exist_ok=True)
        first = root / "_cloob" / "versions" / "v1.json"
        if not first.exists():
            first.write_text((root / "_cloob" / "manifest.json").read_text())
        manifest.update(version=version, parent=version - 1, created_at=manifest["updated_at"])
        (root / "_cloob" / "versions" / f"v{version}.json").write_text(json.dumps(manifest))
    (root / "_cloob" / "manifest.json").write_text(json.dumps(manifest))
    return root


def _fake_checkpoint(run_dir: str, recipe_hash: str, step: int = 30, saved_at: float | None = None):
    """A finished run's checkpoint as the trainer writes its meta (no weights needed to judge the key)."""
    meta = {"recipe_hash": recipe_hash, "total_steps": step, "time": saved_at or time.time(), "run_name": "x"}
    return CheckpointStore(run_dir).save(step, {}, {}, {"step": step}, meta, keep=2)


def test_existing_hashes_and_names_keep_their_byte_form():
    tiny = load_recipe("tiny")
    assert tiny.content_hash() == TINY_HASH == _old_hash(tiny) == tiny.content_hash(legacy=True)
    assert tiny.run_id() == "tiny-cloob-fa244323c9"
    for ov in (["train.steps=40"], ["loss.method=clip", "model.inv_tau=10"], ["data.train=/x"]):
        r = load_recipe("tiny", ov)
        assert r.content_hash() == _old_hash(r), ov  # no data identity, no warm start: as before


def test_retention_and_logging_leave_the_key_alone():
    """`cloob study demo` (keep_checkpoints=1000000) finds the run `cloob demo` (the recipe's 2) made."""
    base = load_recipe("tiny", ["data.train=/d"])
    study = load_recipe("tiny", ["data.train=/d", "train.keep_checkpoints=1000000", "train.log_every=3"])
    assert study.content_hash() == base.content_hash() and study.run_id() == base.run_id()
    assert study.content_hash(legacy=True) == _old_hash(study) != base.content_hash()  # what runs were keyed by
    # What a run computes still changes it.
    assert load_recipe("tiny", ["data.train=/d", "train.steps=40"]).content_hash() != base.content_hash()


def test_a_name_says_the_override_that_runs():
    """The pipeline puts its overrides for every recipe before the recipe entry's own: the last wins in
    load_recipe, and the name says that value only (it was tiny-cloob-steps40-steps30-...)."""
    r = load_recipe("tiny", ["train.steps=40", "train.steps=30"])
    assert r.train.steps == 30
    assert r.run_id() == load_recipe("tiny", ["train.steps=30"]).run_id()
    assert "steps30" in r.run_id() and "steps40" not in r.run_id()


def test_pipeline_refuses_contradicting_overrides():
    from flows.pipeline import check_overrides

    with pytest.raises(CloobError) as e:
        check_overrides("tiny train.steps=30", ["train.steps=40"], ["train.steps=30"])
    assert "train.steps is 40" in e.value.problem and "'tiny train.steps=30'" in e.value.problem
    assert "drop train.steps from one of them" in e.value.fix
    check_overrides("tiny train.steps=30", ["train.steps=30", "model.inv_tau=10"], ["train.steps=30"])


def test_the_key_follows_the_data_content_not_its_place(tmp_path):
    a = _dataset(tmp_path / "a", "1" * 64)
    copy = _dataset(tmp_path / "copy", "1" * 64)
    ident = data_identity(str(a))
    assert ident.content_hash == "1" * 64 and ident.label == "mytable-v1"
    assert data_identity(str(tmp_path / "nowhere")) is None
    assert data_identity(f"{a},{copy}") is None  # several folders: keyed by their places, as before

    def keyed(data):
        ov = [f"data.train={data}", f"train.output={tmp_path}"]
        return load_recipe("tiny", identify("tiny", ov))

    r1 = keyed(a)
    assert r1.data.content_hash == "1" * 64 and r1.run_id().startswith("tiny-cloob-mytable-v1-")
    assert keyed(copy).run_id() == r1.run_id()  # the same version elsewhere: the same run
    assert identify("tiny", identify("tiny", [f"data.train={a}"])) == identify("tiny", [f"data.train={a}"])
    _dataset(a, "2" * 64, version=2)  # a new version of the data in the same folder
    r2 = keyed(a)
    assert r2.run_id().startswith("tiny-cloob-mytable-v2-") and r2.content_hash() != r1.content_hash()
    # An old version, named as such, is the run made when it was the newest.
    assert keyed(f"{a}@v1").run_id() == r1.run_id()
    assert keyed(f"{a}@v2").run_id() == r2.run_id()
    with pytest.raises(CloobError):
        identify("tiny", [f"data.train={a}@v7", f"train.output={tmp_path}"])
    # Shards without a manifest (other tools): keyed by their place, as before.
    plain = tmp_path / "plain"
    synthetic.write_shards(plain, 48, shard_size=48, image_size=32, seed=1)
    r = keyed(plain)
    assert r.data.content_hash is None and r.content_hash() == _old_hash(r)


def test_a_model_of_version_1_retrains_bit_exact_after_versions_2_and_3(tmp_path):
    import shutil

    from cloob.train import train

    data = _dataset(tmp_path / "data", "1" * 64)
    common = [f"train.output={tmp_path}", "train.steps=4", "train.batch_size=16", "data.workers=0",
              "train.progress=false", "schedule.warmup_steps=1", "data.shuffle_buffer=16"]
    first = train(load_recipe("tiny", identify("tiny", [f"data.train={data}", *common])))
    sha = CheckpointStore(first["run_dir"]).latest().meta()["model_sha256"]
    synthetic.write_shards(data, 192, shard_size=48, image_size=32, seed=1)  # new rows: version 2
    _dataset(data, "2" * 64, version=2)
    synthetic.write_shards(data, 288, shard_size=48, image_size=32, seed=1)  # and version 3
    _dataset(data, "3" * 64, version=3)
    newest = load_recipe("tiny", identify("tiny", [f"data.train={data}", *common]))
    assert "mytable-v3" in newest.run_id() and newest.run_dir() != first["run_dir"]
    shutil.rmtree(first["run_dir"])
    again = train(load_recipe("tiny", identify("tiny", [f"data.train={data}@v1", *common])))
    assert again["run_dir"] == first["run_dir"]  # the same key and name
    assert CheckpointStore(again["run_dir"]).latest().meta()["model_sha256"] == sha


def test_runs_made_before_keep_resuming_until_the_data_changes(tmp_path):
    data = _dataset(tmp_path / "data", "1" * 64, updated_at="2026-12-01T00:00:00+00:00")
    ov = [f"data.train={data}", f"train.output={tmp_path}", "train.steps=30"]
    old = load_recipe("tiny", ov)  # the key the run got before data identity: the data's place
    _fake_checkpoint(old.run_dir(), old.content_hash(), saved_at=time.time() - 60)
    keyed = load_recipe("tiny", identify("tiny", ov))
    assert keyed.run_id() == old.run_id() and keyed.data.content_hash is None
    assert trained(keyed) is not None  # still done: the pipeline skips it, as before

    # The same data rewritten after that run (new rows): a new run, named by the data.
    _dataset(data, "2" * 64)
    fresh = load_recipe("tiny", identify("tiny", ov))
    assert fresh.run_id() != old.run_id() and fresh.data.content_hash == "2" * 64 and trained(fresh) is None


def test_a_run_made_with_a_retention_override_before_resumes(tmp_path):
    """Study runs keyed with keep_checkpoints=1000000 in the hash: found under their old name."""
    ov = [f"data.train={tmp_path}/plain", f"train.output={tmp_path}", "train.keep_checkpoints=1000000"]
    r = load_recipe("tiny", ov)
    old_name = r.default_run_name("", legacy=True)
    assert old_name != r.run_id()
    _fake_checkpoint(f"{tmp_path}/runs/{old_name}", r.content_hash(legacy=True), step=300)
    keyed = load_recipe("tiny", identify("tiny", ov))
    assert keyed.run_id() == old_name and trained(keyed) is not None


# ------------------------------------------------------------------------------------- warm starts

def _losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny run of 40 steps, registered as `champion` in the store's registry."""
    from cloob.registry import Registry
    from cloob.train import train

    store = tmp_path_factory.mktemp("store")
    data = _dataset(store / "datasets" / "mytable", "1" * 64)
    common = [f"data.train={data}", f"train.output={store}", "train.batch_size=32", "data.workers=0",
              "train.log_every=1", "train.progress=false", "schedule.warmup_steps=5", "data.shuffle_buffer=40"]
    summary = train(load_recipe("tiny", identify("tiny", [*common, "train.steps=40"])))
    reg = Registry(str(store / "registry"))
    entry = reg.register(summary["checkpoint"], aliases=["champion"])
    return store, common, summary, entry


def test_a_warm_start_begins_at_its_parents_loss_and_names_it(parent):
    from cloob.registry import Registry
    from cloob.train import train

    store, common, summary, entry = parent
    ov = identify("tiny", [*common, "train.steps=3", "train.init_from=champion"])
    r = load_recipe("tiny", ov)
    assert r.train.init_sha256 == entry["id"] and r.train.init_entry == entry["id"]
    scratch = load_recipe("tiny", identify("tiny", [*common, "train.steps=3"]))
    assert r.run_id() != scratch.run_id()  # the parent's weights are part of the key
    child = train(r)
    fresh = train(scratch)
    parent_loss = sum(_losses(summary["run_dir"])[-5:]) / 5
    child_first, fresh_first = _losses(child["run_dir"])[0], _losses(fresh["run_dir"])[0]
    print(f"first-step loss: warm start {child_first:.4f}, parent's last 5 steps {parent_loss:.4f}, "
          f"from scratch {fresh_first:.4f}")
    assert abs(child_first - parent_loss) < abs(fresh_first - parent_loss) / 2, (child_first, parent_loss, fresh_first)
    meta = CheckpointStore(child["run_dir"]).latest().meta()
    assert meta["init_from"]["sha256"] == entry["id"] and meta["init_from"]["ref"] == "champion"
    assert meta["data"]["content_hash"] == "1" * 64

    reg = Registry(str(store / "registry"))
    child_entry = reg.register(child["checkpoint"])
    assert child_entry["parent"]["id"] == entry["id"] and child_entry["data_version"] == "mytable-v1"
    assert child_entry["data_manifest_hash"] == "1" * 64
    assert reg.get(entry["id"]).get("parent") is None

    # A fresh optimizer and schedule: the child's steps count from 1 with the warmup's learning rate.
    rows = [json.loads(x) for x in (Path(child["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1


def test_registry_list_shows_data_version_and_parent(parent, capsys):
    from cloob.cli import main

    store, *_ = parent
    assert main(["registry", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "data version" in out and "parent" in out and "mytable" in out
    # Whole run names: their head says recipe and method (it used to be cut from the left: 'loob-steps...').
    from cloob.registry import Registry

    for e in Registry(str(store / "registry")).entries():
        assert f"  {e['run_id']} " in out and e["run_id"].startswith("tiny-")


def test_a_wrong_init_from_is_one_error_with_the_fix(parent):
    store, common, *_ = parent
    with pytest.raises(CloobError) as e:
        identify("tiny", [*common, "train.steps=3", "train.init_from=chamption"])
    assert "train.init_from=chamption" in e.value.problem and "champion" in e.value.fix
    assert "from scratch" in e.value.fix


def test_a_study_sweep_of_init_from_with_none_is_from_scratch():
    """`sweep: {train.init_from: [null, champion]}` writes train.init_from=None for the first cell."""
    for none in ("None", "null", ""):
        r = load_recipe("tiny", [f"train.init_from={none}"])
        assert r.train.init_from is None and r.run_id() == load_recipe("tiny").run_id()
    assert identify("tiny", ["train.init_from=None"]) == ["train.init_from=None"]  # nothing to resolve


@pytest.mark.slow
def test_a_warm_start_under_two_ranks(parent):
    """cloob train's launcher resolves the alias once; both gloo ranks load the parent's weights (the
    same file, sha256-checked) and the run starts at the parent's loss, not at a fresh model's."""
    from cloob.run.launch import launch
    from cloob.train import train

    store, common, summary, entry = parent
    env = child_env({}, OMP_NUM_THREADS="1")
    ov = [o for o in common if not o.startswith("train.batch_size")]
    result = launch("tiny", [*ov, "train.batch_size=16", "train.steps=2", "train.init_from=champion"],
                    nproc_per_node=2, env=env)
    assert result.returncode == 0, "\n".join(result.log_tail)
    meta = CheckpointStore(result.run_dir).latest().meta()
    assert meta["init_from"]["entry"] == entry["id"] and meta["world_size"] == 2
    fresh = train(load_recipe("tiny", identify("tiny", [*common, "train.steps=1"])))
    parent_loss = sum(_losses(summary["run_dir"])[-5:]) / 5
    first, fresh_first = _losses(result.run_dir)[0], _losses(fresh["run_dir"])[0]
    print(f"2 ranks, first-step loss: warm start {first:.4f}, parent {parent_loss:.4f}, from scratch {fresh_first:.4f}")
    assert abs(first - parent_loss) < abs(fresh_first - parent_loss) / 2, (first, parent_loss, fresh_first)


def test_the_retrain_deployment_takes_init_from(capsys, monkeypatch):
    """`cloob deploy --init-from champion` makes the scheduled pipeline warm-start; without it the
    deployment has no init_from and the pipeline's default (from scratch) holds."""
    import flows.deploy as deploy
    from flows.cli import main as cloob_main
    from flows.pipeline import pipeline

    def no_server(*a, **k):
        raise AssertionError("a dry run contacted the server")

    monkeypatch.setattr(deploy, "check_server", no_server)
    monkeypatch.setattr(deploy, "apply_plan", no_server)

    def params(*argv):
        assert cloob_main(["deploy", "--dry-run", "--json", "--store", "s3://b/x", "--spec", "demo", *argv]) == 0
        out = json.loads(capsys.readouterr().out)
        return {d["name"]: d for d in out["deployments"]}["cloob-pipeline/retrain"]["parameters"]

    assert params("--init-from", "champion")["init_from"] == "champion"
    assert "init_from" not in params()
    assert pipeline.parameters.properties["init_from"]["default"] is None


def test_deploy_refuses_a_recipe_override_that_contradicts_an_override(capsys, monkeypatch):
    import flows.deploy as deploy
    from flows.cli import main as cloob_main

    monkeypatch.setattr(deploy, "check_server", lambda *a, **k: None)
    rc = cloob_main(["deploy", "--dry-run", "--store", "s3://b/x", "--spec", "demo", "--recipe", "tiny train.steps=30",
                      "--override", "train.steps=40"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.steps is 40" in err and "fix: drop train.steps" in err


def test_bare_torchrun_refuses_an_unresolved_init_from(tmp_path):
    from cloob.train import train

    data = _dataset(tmp_path / "data", "1" * 64)
    with pytest.raises(CloobError) as e:
        train(load_recipe("tiny", [f"data.train={data}", f"train.output={tmp_path}", "train.steps=2",
                                   "train.init_from=champion", "data.workers=0", "train.batch_size=16"]))
    assert "not resolved" in e.value.problem and "cloob train" in e.value.fix
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("meta.json"))
