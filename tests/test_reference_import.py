"""`cloob import ml-jku-cloob`: a checkpoint in the layout of the paper's code (ml-jku/cloob), made here
from tests/reference_cloob_model.py with random weights (nothing is downloaded), becomes one of our
checkpoints: the same embeddings and zero-shot classifier as the reference model, loaded strictly,
registered with its provenance, evaluated beside the paper's YFCC numbers; every bad file is one
error, exit 2, with nothing written and nothing of it run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from cloob import cli
from cloob.data import synthetic
from cloob.errors import CloobError
from cloob.evaluate.models import load_checkpoint
from cloob.evaluate.sets.spec import load_downstream_spec
from cloob.evaluate.zeroshot import build_classifier
from cloob.registry import Registry
from cloob.registry.reference_import import choose_arch, fit_strictly, import_reference, infer_encoder, load_safely, rename_keys
from cloob.results.table import read_rows

sys.path.insert(0, str(Path(__file__).parent))
import reference_cloob_model as ref  # noqa: E402

NAME = "ml-jku-cloob-rn50-yfcc15m"
FILE = "cloob_rn50_yfcc_epoch_28.pt"


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rn50(tmp_path_factory):
    """The reference RN50 (random, seeded), its checkpoint as ml-jku/cloob's training saves it (from the
    GPU, with a path object in model_config_file), and `cloob import` of it into a store."""
    d = tmp_path_factory.mktemp("reference")
    model = ref.build(ref.RN50, seed=0)
    path = d / FILE
    ref.save_reference_checkpoint(model, path, model_config_file="RN50.json")
    store = d / "store"
    code = cli.main(["import", "ml-jku-cloob", str(path), "--store", str(store)])
    assert code == 0
    return {"model": model, "file": path, "store": store, "out": store / "imports" / NAME}


def _images(n: int, size: int) -> list:
    rng = random.Random(3)
    return [synthetic.sample(rng, size)[0] for _ in range(n)]


def test_converted_rn50_gives_the_reference_embeddings_and_classifier(rn50):
    em = load_checkpoint(str(rn50["out"]))  # strict: open_clip's RN50-quickgelu, every key
    model, reference = em.model, rn50["model"]
    assert em.info["arch"] == "RN50-quickgelu" and isinstance(model, open_clip.model.CLIP)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(30.0)  # inv_tau, from logit_inv_tau
    images = torch.stack([em.preprocess(im) for im in _images(6, 200)])
    spec = load_downstream_spec("shapes")
    classes = spec.classes[::3]  # 6 of the 18
    texts = [t.format(c) for c in classes for t in spec.templates]
    with torch.no_grad():
        ours_img, ref_img = model.encode_image(images), reference.encode_image(images)
        ours_txt, ref_txt = model.encode_text(em.tokenizer(texts)), reference.encode_text(em.tokenizer(texts))
    norm = torch.nn.functional.normalize
    sims = norm(ref_img, dim=-1) @ norm(ref_img, dim=-1).T
    assert sims.min() < 0.9  # the pictures give different embeddings: the check is not of a constant
    diffs = {}
    for what, ours, theirs in (("image", ours_img, ref_img), ("text", ours_txt, ref_txt)):
        assert 0.5 < theirs.norm(dim=-1).min() and theirs.norm(dim=-1).max() < 50
        diffs[what] = float((ours - theirs).abs().max())
        diffs[f"{what} normalised"] = float((norm(ours, dim=-1) - norm(theirs, dim=-1)).abs().max())
    ours = build_classifier(model, em.tokenizer, classes, spec.templates, "cpu")
    theirs = ref.reference_classifier(reference, em.tokenizer, classes, spec.templates)
    assert ours.shape == theirs.shape == (1024, len(classes))
    diffs["zero-shot classifier"] = float((ours - theirs).abs().max())
    print("max abs diff, converted vs reference: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert all(v <= 1e-5 for v in diffs.values()), diffs
    assert torch.equal((norm(ours_img, dim=-1) @ ours).argmax(1), (norm(ref_img, dim=-1) @ theirs).argmax(1))


def test_rn50x4_keys_and_shapes_fit_open_clip_strictly():
    """The real RN50x4 key set and shapes (on the meta device: no memory, no time); RN50's is loaded for
    real above."""
    ddp_keys = {f"module.{k}": v for k, v in ref.build(ref.RN50x4, 0, hopfield=True, device="meta").state_dict().items()}
    renamed, dropped = rename_keys(ddp_keys)
    assert list(dropped) == ["logit_scale_hopfield"]
    assert infer_encoder(renamed) == "RN50x4"
    assert choose_arch(None, {}, renamed, "f") == "RN50x4-quickgelu"
    ordered, preprocess = fit_strictly("RN50x4-quickgelu", renamed, "f")
    want = open_clip.create_model("RN50x4-quickgelu", device="meta").state_dict()
    assert list(ordered) == list(want) and all(ordered[k].shape == want[k].shape for k in want)
    assert preprocess["size"] == 288
    with pytest.raises(CloobError, match=r"(?s)do not fit RN50-quickgelu.*fix: its shapes fit RN50x4: give --arch RN50x4"):
        fit_strictly("RN50-quickgelu", renamed, "f")
    with pytest.raises(CloobError, match="says it is RN50x4"):
        choose_arch("RN50", {"model_config_file": "RN50x4.json"}, renamed, "f")


def test_the_import_is_an_ordinary_checkpoint_registered_with_its_provenance(rn50, capsys):
    meta = json.loads((rn50["out"] / "meta.json").read_text())
    sha = _sha256(rn50["file"])
    assert meta["arch"] == "RN50-quickgelu" and meta["method"] == "cloob" and meta["pretraining_data"] == "yfcc15m"
    assert meta["step"] is None and meta["epoch"] == 28
    src = meta["source"]
    assert src["kind"] == "ml-jku-cloob" and src["file"] == FILE and src["sha256"] == sha
    assert src["bytes"] == rn50["file"].stat().st_size and src["model_config_file"] == "RN50.json"
    assert src["dropped"] == {} and src["inv_tau"] == pytest.approx(30.0)
    assert sorted(os.listdir(rn50["out"])) == ["meta.json", "open_clip_config.json", "open_clip_pytorch_model.bin"]
    # plain open_clip loads it strictly, by file or by folder
    model = open_clip.create_model("RN50-quickgelu", pretrained=str(rn50["out"] / "open_clip_pytorch_model.bin"))
    assert model.visual.attnpool.c_proj.weight.shape == (1024, 2048)
    reg = Registry(str(rn50["store"] / "registry"))
    entry = reg.resolve(NAME)
    assert entry["id"] == meta["model_sha256"] and reg.aliases()["latest"] == entry["id"]
    assert entry["source"]["sha256"] == sha and entry["source"]["file"] == FILE
    assert (entry["method"], entry["arch"], entry["data_name"], entry["step"]) == ("cloob", "RN50-quickgelu", "yfcc15m", None)
    assert entry["recipe"] is None and entry["run_dir"] is None and entry["run_id"] == NAME
    # The same file again: nothing written, nothing registered.
    before = {p.name: p.stat().st_mtime_ns for p in rn50["out"].iterdir()}
    capsys.readouterr()
    assert cli.main(["import", "ml-jku-cloob", str(rn50["file"]), "--store", str(rn50["store"])]) == 0
    out = capsys.readouterr().out
    assert "already imported" in out and "already registered" in out
    assert f"evaluate: cloob evaluate {NAME} --datasets all" in out
    assert {p.name: p.stat().st_mtime_ns for p in rn50["out"].iterdir()} == before
    assert len(reg.entries()) == 1


def test_evaluate_the_import_beside_the_papers_yfcc_numbers(rn50, tmp_path, capsys):
    """`cloob evaluate <name>` on a generated set named as one of the paper's (gtsrb: its classes are
    matched by sorted folder order), then the report: the import's column, the paper's yfcc15m RN50
    columns beside it."""
    spec = load_downstream_spec("gtsrb")
    data = tmp_path / "gtsrb"
    for i, im in enumerate(_images(len(spec.classes), 64)):
        (data / f"{i:05d}").mkdir(parents=True)
        im.save(data / f"{i:05d}" / "0.jpg")
    store = str(rn50["store"])
    assert cli.main(["evaluate", NAME, "--data", f"gtsrb={data}", "--store", store, "--no-progress",
                     "--workers", "0", "--limit", "4", "--batch-size", "4"]) == 0
    [row] = read_rows(str(rn50["store"] / "results")).to_pylist()
    assert (row["run_id"], row["method"], row["arch"], row["pretraining_data"], row["step"]) == \
        (NAME, "cloob", "RN50-quickgelu", "yfcc15m", None)
    assert row["checkpoint_id"] == json.loads((rn50["out"] / "meta.json").read_text())["model_sha256"]
    from cloob.results.arrange import build_report

    rep = build_report(str(rn50["store"] / "results"))
    assert rep.paper == ("yfcc15m", "RN50", "")
    cols = rep.zeroshot.columns
    ours = next(i for i, c in enumerate(cols) if c.startswith("cloob RN50-quickgelu yfcc15m (ml-jku-cloob-rn50"))
    assert cols[ours + 1:ours + 3] == ["paper CLIP (yfcc15m RN50)", "paper CLOOB (yfcc15m RN50)"]
    gtsrb = next(r for r in rep.zeroshot.rows if r[0].startswith("gtsrb"))
    assert gtsrb[ours] == pytest.approx(100 * row["top1"]) and gtsrb[ours + 2].value == 8.1  # the paper's CLOOB
    capsys.readouterr()
    assert cli.main(["results", "--store", store]) == 0
    assert "paper CLOOB" in capsys.readouterr().out
    md = (rn50["store"] / "results" / "report" / "results.md").read_text()
    assert ("| cloob RN50-quickgelu yfcc15m (ml-jku-cloob-rn50-yfcc15m) | paper CLIP (yfcc15m RN50) "
            "| paper CLOOB (yfcc15m RN50) |") in md


def test_first_commit_checkpoint_with_method_and_hopfield_scale(rn50, tmp_path, capsys):
    """d1312e3's model also holds logit_scale_hopfield (dropped, its value kept) and the file `method`;
    one command imports it (here in the pre-zip format) and the fixture's file side by side."""
    obj = load_safely(str(rn50["file"]))
    obj["state_dict"]["module.logit_scale_hopfield"] = torch.tensor(math.log(8.0))
    obj.update(epoch=3, method="clip", model_config_file=Path("/home/u/RN50.json"))
    path = tmp_path / "epoch_3.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=False)  # torch < 1.6's format: a pickle, not a zip
    store = rn50["store"]  # the fixture's import has the same weights: one registry entry, two names
    capsys.readouterr()
    assert cli.main(["import", "ml-jku-cloob", str(path), str(rn50["file"]), "--store", str(store),
                     "--alias", "mine"]) == 0
    out = capsys.readouterr().out
    assert "dropped logit_scale_hopfield" in out and "already imported" in out
    assert f"evaluate: cloob evaluate ml-jku-clip-rn50-yfcc15m {NAME} --datasets all" in out
    meta = json.loads((store / "imports" / "ml-jku-clip-rn50-yfcc15m" / "meta.json").read_text())
    assert meta["method"] == "clip" and meta["epoch"] == 3
    assert meta["source"]["dropped"] == {"logit_scale_hopfield": pytest.approx(math.log(8.0))}
    assert meta["source"]["model_config_file"] == "RN50.json" and meta["source"]["method"] == "clip"
    reg = Registry(str(store / "registry"))
    assert {"mine", "ml-jku-clip-rn50-yfcc15m", NAME} <= set(reg.aliases())
    assert reg.resolve("ml-jku-clip-rn50-yfcc15m")["id"] == reg.resolve(NAME)["id"] == reg.resolve("mine")["id"]
    with pytest.raises(CloobError, match="says it was trained with clip"):
        import_reference(str(path), store=str(tmp_path / "s2"), method="cloob")
    assert cli.main(["import", "ml-jku-cloob", str(path), str(path), "--name", "x"]) == 2
    assert "--name and --out name one import" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()


# ----------------------------------------------------------------------------------- refusals

class _RunsCode:
    """Unpickling this calls open(marker, 'w'): a file appears if anything of the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error says)."""
    marker = tmp / "MARKER"
    sd = {"module.logit_inv_tau": torch.tensor(3.4)}
    files = {}

    def put(name, obj, match, save=torch.save):
        p = tmp / f"{name}.pt"
        save(obj, p)
        files[name] = (p, match)

    put("runs_code_torch", {"state_dict": sd, "epoch": 1, "evil": _RunsCode(marker)},
        r"refused .*would call (io|builtins)\.open.*nothing of it ran")
    put("runs_code_pickle", {"state_dict": sd, "evil": _RunsCode(marker)}, r"refused .*nothing of it ran",
        save=lambda o, p: p.write_bytes(pickle.dumps(o, protocol=2)))
    put("a_list", [torch.ones(1)], "holds a list: neither")
    put("no_tensors", {"state_dict": {"a": 1}}, "not a mapping of parameter names to tensors")
    put("other_dict", {"model": 1, "weights": 2}, "holds a dict with the keys model, weights")
    put("wrong_keys", {"state_dict": {"module.fc.weight": torch.ones(2, 2)}},
        "cannot tell the architecture")
    (tmp / "text.pt").write_text("not a checkpoint\n")
    files["text"] = (tmp / "text.pt", "neither a zip archive nor a pickle")
    (tmp / "folder.pt").mkdir()
    files["folder"] = (tmp / "folder.pt", "is a folder, not a file")
    files["missing"] = (tmp / "missing.pt", "does not exist")
    return files


def test_every_bad_file_is_one_error_exit_2_nothing_written_nothing_run(tmp_path, capsys):
    files = _bad_files(tmp_path)
    store = tmp_path / "store"
    for name, (path, match) in files.items():
        capsys.readouterr()
        assert cli.main(["import", "ml-jku-cloob", str(path), "--store", str(store)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "fix: " in err and "Traceback" not in err, (name, err)
        assert __import__("re").search(match, err), (name, err)
    assert not (tmp_path / "MARKER").exists()  # neither pickle's __reduce__ ran
    assert not store.exists()  # nothing half-written: no imports/, no registry/
    # Keys of another model: one error naming the misfit and the fix.
    with pytest.raises(CloobError, match=r"do not fit RN50-quickgelu: keys \d+ missing"):
        import_reference(str(files["wrong_keys"][0]), store=str(store), arch="RN50")
    with pytest.raises(CloobError, match="open_clip has no Foo-quickgelu"):
        import_reference(str(files["wrong_keys"][0]), store=str(store), arch="Foo")
    assert not store.exists()


def test_loading_is_weights_only_and_onto_the_cpu(rn50, tmp_path):
    """The fixture's file is tagged cuda:0 (saved from a GPU) and holds a PosixPath: it loads here, on
    a machine whose torch may have no CUDA, and a plain weights-only load without the path allowed
    refuses it."""
    obj = load_safely(str(rn50["file"]))
    assert obj["state_dict"]["module.logit_inv_tau"].device.type == "cpu"
    assert type(obj["model_config_file"]).__name__ == "PosixPath"
    assert set(obj) == {"epoch", "name", "state_dict", "optimizer", "scheduler", "model_config_file"}
    with pytest.raises(pickle.UnpicklingError):
        torch.load(rn50["file"], map_location="cpu", weights_only=True)


def test_a_folder_holding_another_checkpoint_is_not_overwritten(rn50, tmp_path):
    obj = load_safely(str(rn50["file"]))
    obj["state_dict"]["module.transformer.ln_final.bias"] += 0.01  # other weights, the same name
    path = tmp_path / FILE
    torch.save(obj, path)
    with pytest.raises(CloobError, match="holds another checkpoint"):
        import_reference(str(path), store=str(rn50["store"]))
    meta = json.loads((rn50["out"] / "meta.json").read_text())
    assert meta["source"]["sha256"] == _sha256(rn50["file"])  # untouched


def test_imports_of_rn50_and_rn50x4_each_get_the_papers_columns(tmp_path):
    """Both published imports in one table: the paper's yfcc15m RN50 and RN50x4 columns both, each
    with its own numbers (rows as `cloob evaluate` writes them for the two imports)."""
    from datetime import UTC, datetime

    from cloob.results.arrange import build_report
    from cloob.results.table import append_rows

    def row(run, arch, top1, ckpt):
        return {"run_id": run, "checkpoint_id": ckpt, "dataset": "imagenet", "task": "zeroshot", "method": "cloob",
                "arch": arch, "pretraining_data": "yfcc15m", "step": None, "n_images": 50000, "n_skipped": 0,
                "n_classes": 1000, "main_metric": "top1", "main_value": top1, "top1": top1,
                "finished_at": datetime.now(UTC), "row_uuid": ckpt}

    uri = str(tmp_path / "results")
    append_rows(uri, [row("ml-jku-cloob-rn50-yfcc15m", "RN50-quickgelu", 0.357, "a" * 64),
                      row("ml-jku-cloob-rn50x4-yfcc15m", "RN50x4-quickgelu", 0.39, "b" * 64)])
    rep = build_report(uri)
    cols = rep.zeroshot.columns
    imagenet = rep.zeroshot.row("imagenet")
    got = {c: imagenet[cols.index(c)].value for c in cols if c.startswith("paper ")}
    assert got == {"paper CLIP (yfcc15m RN50)": 34.6, "paper CLOOB (yfcc15m RN50)": 35.7,
                   "paper CLIP (yfcc15m RN50x4)": 37.7, "paper CLOOB (yfcc15m RN50x4)": 39.0}
    assert any("yfcc15m RN50 and yfcc15m RN50x4" in n for n in rep.notes)
    only = build_report(uri, paper="yfcc15m:RN50x4")  # a named setting: its columns alone, as before
    assert [c for c in only.zeroshot.columns if c.startswith("paper ")] == [
        "paper CLIP (yfcc15m RN50x4)", "paper CLOOB (yfcc15m RN50x4)"]
