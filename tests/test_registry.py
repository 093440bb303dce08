"""The checkpoint registry: lineage, aliases, best-per-dataset, and many writers at once on a folder
and on S3 (moto).

Spawned writer processes import this module, so its top-level imports stay light (torch is imported
where a checkpoint is made, in the test process only).
"""

import hashlib
import json
import multiprocessing as mp
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from cloob import cli
from cloob.errors import CloobError
from cloob.registry import Registry
from cloob.results.table import append_rows
from cloob.train.checkpoint import MODEL_FILE, CheckpointStore


def _checkpoint(run_dir: str, step: int, seed: int, data: str | None = None, method: str = "cloob") -> str:
    """A complete checkpoint as training writes it (a small state dict stands in for a model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ref = CheckpointStore(run_dir).save(step, {"w": torch.randn(4, generator=g)}, {"model_cfg": {}}, {"step": step},
                                        {"arch": "cloob-tiny-vit", "method": method, "run_name": run_dir.rsplit("/", 1)[-1],
                                         "recipe_name": "tiny", "recipe_hash": "r" * 8, "code_version": "0.1.0+gtest",
                                         "metrics": {"loss": 1.5 - step / 1000}, "samples_seen": step * 16}, keep=5)
    if data is not None and not run_dir.startswith("s3://"):
        Path(run_dir, "recipe.yaml").write_text(yaml.safe_dump({"data": {"train": data}, "loss": {"method": method}}))
    return ref.url


def test_register_records_lineage_and_is_idempotent(tmp_path):
    data = tmp_path / "datasets" / "cc3m"
    (data / "_cloob").mkdir(parents=True)
    (data / "_cloob" / "manifest.json").write_text(json.dumps({"name": "cc3m", "spec": {"name": "cc3m"},
                                                               "content_hash": "c" * 64}))
    ckpt = _checkpoint(str(tmp_path / "runs" / "run-a"), 200, seed=1, data=str(data))
    reg = Registry(str(tmp_path / "registry"))
    entry = reg.register(str(tmp_path / "runs" / "run-a"))  # a run folder: its latest checkpoint
    sha = hashlib.sha256(Path(ckpt, MODEL_FILE).read_bytes()).hexdigest()
    assert entry["id"] == entry["checkpoint_sha256"] == sha
    assert entry["checkpoint_uri"] == ckpt and entry["run_id"] == "run-a" and entry["step"] == 200
    assert entry["data_name"] == "cc3m" and entry["data_manifest_hash"] == "c" * 64
    assert entry["recipe"]["data"]["train"] == str(data) and entry["recipe_hash"] == "r" * 8
    assert entry["code_version"] == "0.1.0+gtest" and entry["training_metrics"]["loss"] == pytest.approx(1.3)
    again = reg.register(ckpt)
    assert again == entry and len(reg.entries()) == 1
    assert reg.aliases() == {"latest": sha}


def test_aliases_resolve_and_errors(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    a = reg.register(_checkpoint(str(tmp_path / "runs" / "a"), 10, seed=1), aliases=["candidate"])
    b = reg.register(_checkpoint(str(tmp_path / "runs" / "b"), 20, seed=2))
    assert reg.resolve("latest")["id"] == b["id"] and reg.resolve("candidate")["id"] == a["id"]
    assert reg.resolve(a["id"][:10])["id"] == a["id"]
    assert reg.resolve(a["checkpoint_uri"] + "/")["id"] == a["id"]
    reg.set_alias("candidate", b["id"], reason="promoted")
    assert reg.resolve("candidate")["id"] == b["id"]
    assert [m["entry"] for m in reg.alias_history("candidate")] == [a["id"], b["id"]]
    for bad in ("-x", "a/b", "deadbeef", ""):
        with pytest.raises(CloobError, match="not a plain name|a hex string, as entry ids are"):
            reg.set_alias(bad, a["id"])
    with pytest.raises(CloobError, match="no registry entry"):
        reg.set_alias("x", "0" * 64)
    with pytest.raises(CloobError, match="nothing in the registry"):
        reg.resolve("nope")
    with pytest.raises(CloobError, match="does not exist"):
        reg.register(str(tmp_path / "missing"))


def _row(entry_id: str, dataset: str, value: float) -> dict:
    now = datetime.now(UTC)
    return {"run_id": "r", "checkpoint_id": entry_id, "dataset": dataset, "task": "zeroshot", "main_metric": "top1",
            "main_value": value, "top1": value, "n_images": 10, "n_skipped": 0, "finished_at": now,
            "row_uuid": uuid.uuid4().hex}


def test_best_per_dataset_and_cli(tmp_path, capsys):
    store = tmp_path / "store"
    reg = Registry(str(store / "registry"))
    a = reg.register(_checkpoint(str(tmp_path / "runs" / "a"), 10, seed=1, method="clip"))
    b = reg.register(_checkpoint(str(tmp_path / "runs" / "b"), 10, seed=2))
    append_rows(str(store / "results"), [_row(a["id"], "flowers102", 0.2), _row(b["id"], "flowers102", 0.3),
                                         _row(a["id"], "gtsrb", 0.5), _row(b["id"], "gtsrb", 0.1),
                                         _row("f" * 64, "gtsrb", 0.9)])  # not registered: not a candidate
    assert reg.update_best(str(store / "results")) == {"best-flowers102": b["id"], "best-gtsrb": a["id"]}
    assert reg.update_best(str(store / "results")) == {}  # nothing changed, nothing moves
    assert cli.main(["registry", "show", "best-gtsrb", "--store", str(store)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == a["id"] and "best-gtsrb" in shown["aliases"]
    assert {e["dataset"]: e["main_value"] for e in shown["evaluations"]} == {"flowers102": 0.2, "gtsrb": 0.5}
    assert cli.main(["registry", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "best-flowers102" in out
    assert cli.main(["registry", "resolve", "latest", "--store", str(store)]) == 0
    assert capsys.readouterr().out.strip() == b["checkpoint_uri"]
    assert cli.main(["registry", "alias", "prod", a["id"][:8], "--store", str(store)]) == 0
    assert reg.resolve("prod")["id"] == a["id"]
    assert cli.main(["registry", "show", "nope", "--store", str(store)]) == 2
    assert "nothing in the registry" in capsys.readouterr().err


def _register_one(registry: str, checkpoint: str) -> None:
    Registry(registry).register(checkpoint, aliases=["shared"])


def _many_writers(registry: str, runs: str, n: int) -> None:
    checkpoints = [_checkpoint(f"{runs}/run-{i}", 5, seed=100 + i) for i in range(n)]
    ctx = mp.get_context("spawn")  # children inherit os.environ: the S3 endpoint and keys
    procs = [ctx.Process(target=_register_one, args=(registry, c)) for c in checkpoints]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reg = Registry(registry)
    assert len(reg.entries()) == n
    history = reg.alias_history("shared")
    assert len(history) == n and len(reg.alias_history("latest")) == n
    assert reg.aliases()["shared"] == history[-1]["entry"]  # one consistent answer: the newest move


def test_concurrent_writers_on_a_folder(tmp_path):
    _many_writers(str(tmp_path / "registry"), str(tmp_path / "runs"), 6)


def test_concurrent_writers_on_s3(s3):
    s3.mkdir("registry-bucket")
    _many_writers("s3://registry-bucket/store/registry", "s3://registry-bucket/store/runs", 4)


def _moves(registry: Path) -> list[Path]:
    return sorted((registry / "aliases").rglob("*.json"))


def test_registering_again_changes_nothing(tmp_path, capsys):
    """register A, register B, register A again: `latest` stays on B, no alias move is added, and the
    command says A was already registered (the pipeline's register task relies on this)."""
    store = tmp_path / "store"
    a = _checkpoint(str(tmp_path / "runs" / "a"), 10, seed=1)
    b = _checkpoint(str(tmp_path / "runs" / "b"), 10, seed=2)
    assert cli.main(["registry", "register", a, "--alias", "candidate", "--store", str(store)]) == 0
    assert cli.main(["registry", "register", b, "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.count("registered ") == 2 and "already" not in out
    reg = Registry(str(store / "registry"))
    before = _moves(store / "registry")
    entries_before = sorted(p.read_bytes() for p in (store / "registry" / "entries").iterdir())
    b_id = reg.aliases()["latest"]

    assert cli.main(["registry", "register", a, "--alias", "candidate", "--store", str(store)]) == 0
    assert reg.aliases()["latest"] == b_id and reg.resolve("candidate")["checkpoint_uri"] == a
    assert _moves(store / "registry") == before
    assert capsys.readouterr().out.startswith("already registered ")
    assert sorted(p.read_bytes() for p in (store / "registry" / "entries").iterdir()) == entries_before
    assert Registry(str(store / "registry")).register(str(tmp_path / "runs" / "a"))["checkpoint_uri"] == a
    assert _moves(store / "registry") == before

    # An alias the user names explicitly still moves to an already registered entry.
    assert cli.main(["registry", "register", b, "--alias", "candidate", "--store", str(store)]) == 0
    assert "moved candidate" in capsys.readouterr().out
    assert reg.resolve("candidate")["id"] == b_id and len(_moves(store / "registry")) == len(before) + 1


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["model", "state", "state-missing", "legacy-model"])
def test_register_refuses_a_damaged_checkpoint(tmp_path, capsys, damage):
    ckpt = Path(_checkpoint(str(tmp_path / "runs" / "a"), 10, seed=1))
    name = MODEL_FILE if "model" in damage else "train_state.pt"
    if damage == "legacy-model":  # meta.json from before the per-file digests: the model sha still counts
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["files"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    if damage == "state-missing":
        (ckpt / name).unlink()
    else:
        _flip(ckpt / name)
    store = tmp_path / "store"
    assert cli.main(["registry", "register", str(ckpt), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "fix:" in err and f"{ckpt}/{name}" in err
    assert not (store / "registry").exists()  # nothing written


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    s3 = request.getfixturevalue("s3")
    bucket = f"reg-{uuid.uuid4().hex[:8]}"
    s3.mkdir(bucket)
    return f"s3://{bucket}/store"


def test_registry_files_keep_their_byte_form_and_lineage_is_read_on_any_store(store_url):
    """An entry is json.dumps(entry, indent=1, sort_keys=True), an alias move json.dumps(move) with
    its keys in the order alias, entry, at, reason: byte for byte what earlier versions wrote. The
    recipe and the dataset manifest are read from the store the run lives on (here also S3)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(store_url)

    def put(rel: str, data: bytes) -> None:
        fs.makedirs(f"{root}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
        fs.pipe_file(f"{root}/{rel}", data)

    data = f"{store_url}/datasets/cc3m"
    put("datasets/cc3m/_cloob/manifest.json",
        json.dumps({"name": "cc3m", "spec": {"name": "cc3m"}, "content_hash": "c" * 64}).encode())
    run = f"{store_url}/runs/a"
    ckpt = _checkpoint(run, 10, seed=1)
    put("runs/a/recipe.yaml", yaml.safe_dump({"data": {"train": data}, "name": "tiny"}).encode())
    reg = Registry(f"{store_url}/registry/")
    entry = reg.register(run, aliases=["mine"], note="ü")
    assert entry["checkpoint_uri"] == ckpt and entry["run_dir"] == run and entry["data"] == data
    assert entry["data_name"] == "cc3m" and entry["data_manifest_hash"] == "c" * 64
    assert entry["recipe"] == {"data": {"train": data}, "name": "tiny"} and entry["note"] == "ü"

    assert fs.cat_file(f"{root}/registry/entries/{entry['id']}.json") == \
        json.dumps(entry, indent=1, sort_keys=True).encode()
    for alias in ("latest", "mine"):
        (path,) = fs.glob(f"{root}/registry/aliases/{alias}/*.json")
        move = json.loads(fs.cat_file(path))
        assert list(move) == ["alias", "entry", "at", "reason"] and move["entry"] == entry["id"]
        assert fs.cat_file(path) == json.dumps(move).encode()
        t = datetime.fromisoformat(move["at"])
        assert path.rsplit("/", 1)[1].startswith(f"{t:%Y%m%dT%H%M%S.%f}-")
    assert reg.aliases() == {"latest": entry["id"], "mine": entry["id"]}
    assert reg.entries() == [entry] and reg.resolve("mine") == entry
