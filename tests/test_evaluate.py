"""Zero-shot evaluation against an independent, direct CLIP zero-shot computation; eval sets as
class folders, webdataset shards and on S3; open_clip weights files; the classifier cache; bad input.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import child_env
from PIL import Image

from cloob import cli
from cloob.data import synthetic
from cloob.errors import CloobError
from cloob.evaluate.datasets import open_classification_set, open_retrieval_set
from cloob.evaluate.models import load_model
from cloob.evaluate.runner import EvalSettings, evaluate_retrieval, evaluate_zeroshot
from cloob.evaluate.sets.spec import load_downstream_spec
from cloob.evaluate.zeroshot import ClassifierCache
from cloob.model import MODEL_CONFIGS_DIR, create_model
from cloob.results.table import read_rows
from cloob.train.checkpoint import MODEL_FILE, CheckpointStore

ARCH = "cloob-tiny-vit"
SPEC = load_downstream_spec("shapes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_random_checkpoint) -> str:
    """A run folder with one checkpoint of a randomly initialised tiny model (seeded)."""
    run = tmp_path_factory.mktemp("run")
    make_random_checkpoint(run, seed=7, step=3)
    return str(run)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    synthetic.write_class_folders(d, per_class=5, image_size=48, seed=2)
    return d


def _settings(**kw):
    return EvalSettings(**{"batch_size": 16, "workers": 0, **kw})


def _direct_zero_shot(model_file: str, root: Path) -> dict:
    """The standard CLIP zero-shot procedure, written out with plain open_clip and torch."""
    open_clip.add_model_config(MODEL_CONFIGS_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=model_file)
    tokenizer = open_clip.get_tokenizer(ARCH)
    model.eval()
    with torch.no_grad():
        weights = []
        for name in SPEC.classes:
            e = model.encode_text(tokenizer([t.format(name) for t in SPEC.templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(dim=0)
            weights.append(m / m.norm())
        weights = torch.stack(weights)  # [classes, dim]
        images, labels, names = [], [], []
        for label, name in enumerate(SPEC.classes):
            for p in sorted((root / name).iterdir()):
                try:
                    images.append(preprocess(Image.open(p).convert("RGB")))
                    labels.append(label)
                    names.append(f"{name}/{p.name}")
                except OSError:
                    pass  # an unreadable image is left out
        x = model.encode_image(torch.stack(images))
        logits = (x / x.norm(dim=-1, keepdim=True)) @ weights.T
    labels = torch.tensor(labels)
    top5 = logits.topk(5, dim=1).indices
    pred = top5[:, 0]
    n = len(labels)
    recalls = [int((pred[labels == c] == c).sum()) / int((labels == c).sum()) for c in range(len(SPEC.classes))]
    return {"top1": int((pred == labels).sum()) / n,
            "top5": int((top5 == labels[:, None]).any(dim=1).sum()) / n,
            "mean_per_class_recall": sum(recalls) / len(recalls), "n": len(labels), "names": names}


def _model_file(checkpoint: str) -> str:
    return str(CheckpointStore(checkpoint).latest().url) + "/" + MODEL_FILE


def _corrupt_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / "red circle" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = (dst / "blue square" / "0000.jpg").read_bytes()
    (dst / "blue square" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return dst


def test_accuracy_equals_direct_clip_zero_shot(checkpoint, folders, tmp_path):
    data = _corrupt_copy(folders, tmp_path / "data")
    em = load_model(checkpoint)
    row = evaluate_zeroshot(em, open_classification_set("shapes", str(data)), _settings(workers=2), progress=False)
    direct = _direct_zero_shot(_model_file(checkpoint), data)
    assert row["n_images"] == direct["n"] == 90
    assert row["n_skipped"] == 2  # the garbage file and the truncated JPEG
    for k in ("top1", "top5", "mean_per_class_recall"):
        assert row[k] == pytest.approx(direct[k], abs=1e-9), k
    assert row["main_metric"] == "top1" and row["main_value"] == row["top1"]
    assert row["step"] == 3 and row["method"] == "cloob" and row["run_id"] == "rand"
    # The per-image outcomes kept for paired comparisons (cloob/results/outcomes.py) give the row's
    # numbers back, and name each image by its path under the set: the pairs, not just the means.
    from cloob.results.outcomes import image_ids, metric

    o = row["outcomes"]
    labels, correct = np.asarray(o["labels"]), np.asarray(o["correct"])
    assert len(correct) == 90 and sorted(o["ids"].tolist()) == sorted(image_ids(direct["names"]).tolist())
    assert metric("top1", correct, labels) == pytest.approx(row["top1"], abs=1e-12)
    assert metric("mean_per_class_recall", correct, labels) == pytest.approx(row["mean_per_class_recall"], abs=1e-12)


def test_shards_and_open_clip_weights_file_give_the_same_numbers(checkpoint, folders, tmp_path):
    # The same images as webdataset shards with `cls`, and the same weights as a plain open_clip file.
    shards = tmp_path / "shards"
    shards.mkdir()
    items = [(p, label) for label, name in enumerate(SPEC.classes) for p in sorted((folders / name).iterdir())]
    for s in range(3):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i, (p, label) in enumerate(items[s::3]):
                for ext, data in (("jpg", p.read_bytes()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{s}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    weights = tmp_path / "weights.pt"
    weights.write_bytes(Path(_model_file(checkpoint)).read_bytes())

    ours = evaluate_zeroshot(load_model(checkpoint), open_classification_set("shapes", str(folders)),
                             _settings(), progress=False)
    ext = load_model(f"{ARCH}={weights}")
    assert ext.info["run_id"] == f"open_clip:{ARCH}:weights.pt" and ext.info["step"] is None
    assert ext.info["checkpoint_id"] == ours["checkpoint_id"]  # same bytes, same identity
    from_shards = evaluate_zeroshot(ext, open_classification_set("shapes", str(shards)), _settings(workers=2),
                                    progress=False)
    for k in ("top1", "top5", "mean_per_class_recall", "n_images"):
        assert from_shards[k] == pytest.approx(ours[k], abs=1e-9), k


def test_classifier_is_cached_per_checkpoint_and_dataset(checkpoint, folders, tmp_path):
    cache = ClassifierCache(str(tmp_path / "cache"))
    em = load_model(checkpoint)
    ds = open_classification_set("shapes", str(folders))
    first = evaluate_zeroshot(em, ds, _settings(limit=20), cache, progress=False)
    assert not first["classifier_cached"] and len(list((tmp_path / "cache").glob("*.pt"))) == 1

    def no_text(*a, **k):
        raise AssertionError("text encoder called although the classifier is cached")

    em.model.encode_text = no_text
    second = evaluate_zeroshot(em, ds, _settings(limit=20), cache, progress=False)
    assert second["classifier_cached"] and second["top1"] == first["top1"] and second["n_images"] == 20


def test_finished_row_counts_a_cpu_or_a_gpu_row_without_loading_the_model(checkpoint, folders, tmp_path, monkeypatch):
    """What the pipeline asks on the CPU pool before it starts a GPU evaluation run: a row of this
    pair made on a CPU or on a GPU (device auto) makes it finished; other settings or data do not."""
    import cloob.evaluate.models
    from cloob.evaluate import pairs as runner
    from cloob.results.table import append_rows

    ds = open_classification_set("shapes", str(folders))
    cpu_results, gpu_results = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    assert runner.finished_row(checkpoint, ds, _settings(limit=10), cpu_results) is None
    row = runner.evaluate_pair(checkpoint, ds, _settings(limit=10), results=cpu_results, progress=False).row
    # The same pair as a GPU worker writes it: under the settings hash of device cuda (bf16 autocast).
    _, cuda_hash = runner.settings_json(_settings(limit=10), torch.device("cuda"), {"task": "zeroshot"})
    assert cuda_hash != row["eval_settings_hash"]
    append_rows(gpu_results, [{**row, "eval_settings_hash": cuda_hash}])

    def no_load(*a, **k):
        raise AssertionError("finished_row loaded the model")

    monkeypatch.setattr(cloob.evaluate.models, "load_model", no_load)
    for results in (cpu_results, gpu_results):
        assert runner.finished_row(checkpoint, ds, _settings(limit=10), results)["row_uuid"] == row["row_uuid"]
        assert runner.finished_row(checkpoint, ds, _settings(limit=11), results) is None  # other numbers
    assert runner.finished_row(checkpoint, ds, _settings(limit=10, device="cpu"), gpu_results) is None
    other = open_classification_set("shapes", str(folders))
    other.identity = "other data"
    assert runner.finished_row(checkpoint, other, _settings(limit=10), cpu_results) is None


def test_class_folder_mismatch_lists_the_differences(checkpoint, folders, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folders, data)
    (data / "red circle").rename(data / "crimson circle")
    shutil.rmtree(data / "blue square")
    with pytest.raises(CloobError) as e:
        open_classification_set("shapes", str(data))
    msg = str(e.value)
    assert "red circle" in msg and "blue square" in msg and "crimson circle" in msg


@pytest.mark.parametrize("make", ["no_class_folders", "no_images", "empty_shard"])
def test_empty_dataset_is_a_clear_error(tmp_path, make):
    data = tmp_path / "data"
    data.mkdir()
    if make == "no_images":
        for name in SPEC.classes:
            (data / name).mkdir()
    if make == "empty_shard":
        tarfile.open(data / "00000.tar", "w").close()
    if make == "empty_shard":
        ds = open_classification_set("shapes", str(data))
        with pytest.raises(CloobError, match="no readable image"):
            evaluate_zeroshot(load_model_random(tmp_path), ds, _settings(), progress=False)
    else:
        with pytest.raises(CloobError, match="empty dataset"):
            open_classification_set("shapes", str(data))


def load_model_random(tmp_path):
    model, *_ = create_model(ARCH)
    CheckpointStore(str(tmp_path / "r")).save(1, model.state_dict(), {}, {}, {"arch": ARCH, "method": "clip"}, keep=1)
    return load_model(str(tmp_path / "r"))


def test_retrieval_recall_equals_direct_computation(checkpoint, make_shards):
    ret = make_shards(60, 25, seed=5, image_size=48)
    em = load_model(checkpoint)
    row = evaluate_retrieval(em, open_retrieval_set(str(ret)), _settings(workers=2), progress=False)
    # Direct: read the shards in order, embed, rank; a hit is a text with the same caption.
    pairs = []
    for tar_path in sorted(ret.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".")[0] for n in members}):
            pairs.append((Image.open(io.BytesIO(members[f"{key}.jpg"])).convert("RGB"), members[f"{key}.txt"].decode()))
    with torch.no_grad():
        x = em.model.encode_image(torch.stack([em.preprocess(im) for im, _ in pairs]), normalize=True)
        y = em.model.encode_text(em.tokenizer([c for _, c in pairs]), normalize=True)
    caps = [c for _, c in pairs]
    sims = x @ y.T
    for k in (1, 5, 10):
        i2t = sum(any(caps[j] == caps[i] for j in sims[i].topk(k).indices.tolist()) for i in range(len(caps)))
        t2i = sum(any(caps[j] == caps[i] for j in sims[:, i].topk(k).indices.tolist()) for i in range(len(caps)))
        assert row[f"i2t_r{k}"] == pytest.approx(i2t / len(caps)), k
        assert row[f"t2i_r{k}"] == pytest.approx(t2i / len(caps)), k
    assert row["n_images"] == 60 and row["task"] == "retrieval"
    assert row["alignment"] == pytest.approx(((x - y) ** 2).sum(dim=1).mean().item(), rel=1e-5)
    from cloob.results.outcomes import image_ids

    hits = [caps[sims[i].argmax().item()] == caps[i] for i in range(len(caps))]  # i2t@1, image by image
    assert sorted(zip(row["outcomes"]["ids"].tolist(), row["outcomes"]["correct"])) == \
        sorted(zip(image_ids([f"{t.name}#{n}" for t in sorted(ret.glob("*.tar"))
                              for n in range(25)][:60]).tolist(), hits))


def test_eval_set_and_results_on_s3(checkpoint, folders, s3, tmp_path, make_shards):
    s3.mkdir("eval-bucket")
    s3.put(str(folders) + "/", "eval-bucket/shapes", recursive=True)
    local = evaluate_zeroshot(load_model(checkpoint), open_classification_set("shapes", str(folders)),
                              _settings(), progress=False)
    code = cli.main([*["evaluate", checkpoint, "--data", "shapes=s3://eval-bucket/shapes", "--workers", "2"],
                     "--store", str(tmp_path), "--results", "s3://eval-bucket/results", "--no-progress"])
    assert code == 0
    rows = read_rows("s3://eval-bucket/results").to_pylist()
    assert len(rows) == 1 and rows[0]["dataset_uri"] == "s3://eval-bucket/shapes"
    assert rows[0]["top1"] == pytest.approx(local["top1"]) and rows[0]["n_images"] == local["n_images"]
    # webdataset shards on S3 (a retrieval set), read through fsspec by the DataLoader workers
    ret = make_shards(30, 10, seed=8)
    s3.put(str(ret) + "/", "eval-bucket/ret", recursive=True)
    local_r = evaluate_retrieval(load_model(checkpoint), open_retrieval_set(str(ret)), _settings(),
                                 progress=False)
    remote_r = evaluate_retrieval(load_model(checkpoint), open_retrieval_set("s3://eval-bucket/ret"),
                                  _settings(workers=2), progress=False)
    assert remote_r["n_images"] == 30 and remote_r["i2t_r5"] == pytest.approx(local_r["i2t_r5"])


def test_cli_end_to_end_trained_run(tmp_path, capsys):
    """prepare-downstream (generated set) -> train a few steps -> evaluate -> results, and a rerun
    that finds the rows already there."""
    from cloob.config import load_recipe
    from cloob.train import train

    shards = tmp_path / "pretrain"
    synthetic.write_shards(shards, 160, shard_size=40, image_size=32, seed=4)
    summary = train(load_recipe("tiny", [f"data.train={shards}", f"train.output={tmp_path / 'runs'}",
                                         "train.steps=12", "train.batch_size=16", "data.workers=0",
                                         "train.progress=false", "train.checkpoint_every=12", "train.run_name=t"]))
    store = tmp_path / "store"
    assert cli.main(["prepare-downstream", "shapes", "--out", str(store / "downstream"), "--no-progress"]) == 0
    data = store / "downstream" / "shapes" / "red circle" / "0000.jpg"
    data.write_bytes(b"corrupt")
    capsys.readouterr()
    argv = ["evaluate", summary["run_dir"], "--datasets", "all", "--store", str(store), "--no-progress",
            "--retrieval", f"held-out={shards}", "--limit", "100"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "shapes" in out and "held-out" in out
    rows = {r["dataset"]: r for r in read_rows(str(store / "results")).to_pylist()}
    assert set(rows) == {"shapes", "held-out"}
    assert rows["shapes"]["n_skipped"] == 1 and rows["shapes"]["step"] == 12
    assert rows["shapes"]["pretraining_data"] == "pretrain" and rows["shapes"]["run_id"] == "t"
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("already in results") == 2
    assert len(read_rows(str(store / "results"), latest=False)) == 2
    # By registry alias: the same checkpoint, so the same row.
    from cloob.registry import Registry

    Registry(str(store / "registry")).register(summary["run_dir"], aliases=["candidate"])
    assert cli.main(["evaluate", "candidate", "--datasets", "shapes", "--store", str(store), "--no-progress",
                     "--limit", "100"]) == 0
    assert capsys.readouterr().out.count("already in results") == 1
    assert cli.main(["evaluate", "nonesuch", "--datasets", "shapes", "--store", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'nonesuch' is neither a checkpoint folder nor known to the registry" in err and "candidate" in err


def test_bad_model_reference_is_one_clear_error(tmp_path, folders, capsys):
    code = cli.main(["evaluate", str(tmp_path / "nope"), "--data", f"shapes={folders}", "--store", str(tmp_path),
                     "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "fix:" in err
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CloobError, match="cannot load"):
        load_model(f"{ARCH}={tmp_path / 'w.pt'}")


def test_openai_torchscript_weights_file(tmp_path):
    """OpenAI's release format: a TorchScript archive (QuickGELU models); loaded into the named arch."""
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, force_quick_gelu=True).eval()
    img = torch.randn(2, 3, 32, 32)
    text = open_clip.get_tokenizer(ARCH)(["a red circle", "a blue square"])
    with pytest.warns():  # tracing warns about its own limits
        torch.jit.trace_module(model, {"encode_image": (img,)}, check_trace=False).save(str(tmp_path / "M.pt"))
    em = load_model(f"{ARCH}={tmp_path / 'M.pt'}")
    with torch.no_grad():
        assert torch.equal(model.encode_image(img), em.model.encode_image(img))
        assert torch.equal(model.encode_text(text), em.model.encode_text(text))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_on_gpu_agrees_with_fp32(checkpoint, folders):
    ds = open_classification_set("shapes", str(folders))
    fp32 = evaluate_zeroshot(load_model(checkpoint), ds, _settings(device="cuda", precision="fp32"), progress=False)
    amp = evaluate_zeroshot(load_model(checkpoint), ds, _settings(device="cuda", precision="auto"), progress=False)
    assert json.loads(amp["eval_settings"])["precision"] == "amp" and amp["device"].startswith("cuda:")
    assert abs(amp["top1"] - fp32["top1"]) <= 3 / fp32["n_images"]  # bf16 may flip a near tie or two


def test_lineage_names_the_prepared_pretraining_dataset(tmp_path, checkpoint):
    """A run trained on `cloob prepare` output records that dataset's spec name and content hash."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    data = tmp_path / "datasets" / "cc3m"
    (data / "_cloob").mkdir(parents=True)
    (data / "_cloob" / "manifest.json").write_text(json.dumps({"name": "cc3m", "spec": {"name": "cc3m"},
                                                               "content_hash": "ab" * 32}))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"data": {"train": str(data)}}))
    info = load_model(str(run)).info
    assert info["pretraining_data"] == "cc3m" and info["pretraining_hash"] == "ab" * 32


def test_evaluate_refuses_a_damaged_model_file(tmp_path, checkpoint, folders, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    model = Path(CheckpointStore(str(run)).latest().url) / MODEL_FILE
    good = model.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    code = cli.main(["evaluate", str(run), "--data", f"shapes={folders}", "--store", str(tmp_path), "--no-progress",
                     "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{model} does not match" in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()
    (model.parent / "train_state.pt").unlink()  # not read by evaluation, but listed in meta.json: missing
    model.write_bytes(good)
    with pytest.raises(CloobError, match="train_state.pt is missing"):
        load_model(str(run))


class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'a').write('pwned')",)


def test_evaluate_refuses_a_model_file_that_would_run_code_saying_it_is_not_weights(tmp_path, checkpoint):
    """Fault report B1b: a model file holding a pickle that calls exec, its digests rewritten to match.
    Refused before anything of it runs, as one message without torch's terminal escape codes, saying
    the file is not a weights file (not that the weights do not fit the architecture)."""
    import hashlib
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    folder = Path(CheckpointStore(str(run)).latest().url)
    model = folder / MODEL_FILE
    marker = tmp_path / "PWNED"
    state = torch.load(model, weights_only=True)
    state["evil"] = _WritesMarker(marker)
    torch.save(state, model)
    data = model.read_bytes()
    meta = json.loads((folder / "meta.json").read_text())
    sha = hashlib.sha256(data).hexdigest()
    meta["files"][MODEL_FILE] = {"sha256": sha, "bytes": len(data)}
    meta["model_sha256"], meta["model_bytes"] = sha, len(data)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))

    with pytest.raises(CloobError) as e:
        load_model(str(run))
    assert not marker.exists()
    assert "\x1b" not in str(e.value) and "\n" not in e.value.problem
    assert f"{model} is not a weights file" in e.value.problem and "exec" in e.value.problem
    assert "architecture" not in e.value.fix


def test_a_failed_model_among_good_ones_exits_2(tmp_path, checkpoint, folders):
    """The README's `cloob evaluate ./runs/*` where ./runs also holds a folder that is no run (here
    ./runs/runs, left by an older default output): the good runs are evaluated, the bad one is one
    error, and the command (the installed entry point, flows.cli) exits 2."""
    import shutil
    import subprocess
    import sys

    runs = tmp_path / "runs"
    shutil.copytree(checkpoint, runs / "tiny-a")
    shutil.copytree(checkpoint, runs / "runs" / "tiny-b")
    root = Path(__file__).parents[1]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", *sorted(map(str, runs.iterdir())),
                           "--data", f"shapes={folders}", "--store", str(tmp_path), "--no-progress", "--workers", "0"],
                          capture_output=True, text=True, timeout=300, cwd=root,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{runs / 'runs'} holds no complete checkpoint" in proc.stderr
    assert "1 of 2 models could not be evaluated" in proc.stderr
    assert len(read_rows(str(tmp_path / "results"))) == 1


def test_models_on_s3_load_as_their_local_copies(checkpoint, s3, tmp_path, monkeypatch):
    """A run folder and an ARCH=<weights file> on S3 load the same weights as the local files; a
    missing weights file on S3 is one clear error and leaves no temporary download behind."""
    import tempfile

    s3.mkdir("model-bucket")
    s3.put(checkpoint + "/", "model-bucket/runs/rand", recursive=True)
    ckpt = "s3://model-bucket/runs/rand/checkpoints/step_00000003"
    local = load_model(checkpoint)
    remote = load_model("s3://model-bucket/runs/rand")
    assert remote.info["checkpoint_uri"] == ckpt and remote.info["checkpoint_id"] == local.info["checkpoint_id"]
    assert remote.info["run_id"] == "rand" and remote.info["step"] == 3
    weights = load_model(f"{ARCH}={ckpt}/{MODEL_FILE}")
    assert weights.info["checkpoint_id"] == local.info["checkpoint_id"]
    for m in (remote, weights):
        assert all(torch.equal(v, local.model.state_dict()[k]) for k, v in m.model.state_dict().items())

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    with pytest.raises(CloobError, match="does not exist"):
        load_model(f"{ARCH}=s3://model-bucket/nothing/here.bin")
    assert list(downloads.iterdir()) == []


def test_a_number_on_a_set_far_from_its_published_size_is_flagged_in_the_row_and_the_report(checkpoint, folders,
                                                                                               tmp_path, capsys):
    """A set whose count is far from its published test size (dead links, a partial copy) is evaluated, but
    its numbers carry the warning: in `cloob evaluate`'s output, the results row and `cloob results`."""
    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "data_specs/downstream/shapes.yaml").read_text())
    data["test_size"] = 1000  # the set holds 18 x 5 = 90
    spec = tmp_path / "shapes_published.yaml"
    spec.write_text(yaml.safe_dump(data))
    code = cli.main(["evaluate", checkpoint, "--data", f"{spec}={folders}", "--store", str(tmp_path), "--no-progress",
                     "--workers", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "warning: shapes: 90 images where the published test split has 1000: 910 (91.0%) missing" in out
    row = read_rows(str(tmp_path / "results")).to_pylist()[0]
    assert row["dataset_warnings"].startswith("90 images where the published test split has 1000")
    assert cli.main(["results", "--results", str(tmp_path / "results")]) == 0
    report = capsys.readouterr().out
    assert "shapes (!)" in report and "shapes (!): 90 images where the published test split has 1000" in report
    # the same set without the published size: no flag
    assert cli.main(["evaluate", checkpoint, "--data", f"shapes={folders}", "--store", str(tmp_path / "b"),
                     "--no-progress", "--workers", "0"]) == 0
    assert read_rows(str(tmp_path / "b" / "results")).to_pylist()[0]["dataset_warnings"] is None


@pytest.mark.slow
def test_three_identical_evaluations_at_once_write_one_row(tmp_path, checkpoint):
    """Three `cloob evaluate` of the same (checkpoint, set, settings) started together: one evaluates,
    the others wait for it (the pair's lock, cloob.evaluate.claim) and reuse its row; the table holds
    one row and no lock is left behind (the 2026-12-07 report: 3 rows per pair)."""
    import subprocess
    import sys

    data = tmp_path / "shapes"
    synthetic.write_class_folders(data, per_class=40, image_size=48, seed=3)
    store = tmp_path / "store"
    root = Path(__file__).parents[1]
    argv = [sys.executable, "-m", "cloob.cli", "evaluate", checkpoint, "--data", f"shapes={data}",
            "--store", str(store), "--no-progress", "--workers", "0"]
    env = child_env(OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env)
             for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
    rows = read_rows(str(store / "results"), latest=False)
    assert len(rows) == 1, [o for o, _ in outs]
    assert len(list((store / "results" / "parts").iterdir())) == 1
    assert sum("(already in results)" in out for out, _ in outs) == 2
    assert not (store / "results" / "locks").exists() or not list((store / "results" / "locks").iterdir())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_claimed_pair_makes_a_second_claim_wait_locally_and_on_s3(where, tmp_path, request, capsys):
    """The pair's lock (cloob.evaluate.claim) is the run folders' lock: on a folder and on S3 a second
    claim of the same pair waits, saying so once, until the first is released; another pair does not."""
    import threading
    import time

    from cloob.evaluate.claim import claim_pair

    if where == "s3":
        request.getfixturevalue("s3").mkdir("claims")
        results = "s3://claims/results"
    else:
        results = str(tmp_path / "results")
    got: list[float] = []

    def second():
        with claim_pair(results, "k1", "m on shapes", poll_s=0.1):
            got.append(time.monotonic())

    with claim_pair(results, "k1", "m on shapes"):
        with claim_pair(results, "k2", "m on colors"):  # another pair: not held up
            pass
        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.0)
        assert not got
        released = time.monotonic()
    t.join(timeout=30)
    assert got and got[0] >= released
    err = capsys.readouterr().err
    assert err.count("m on shapes: waiting for another evaluation of it") == 1, err
