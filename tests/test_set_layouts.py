"""The paper's evaluation sets in the layouts users really have (tests/set_replicas.py: faithful replicas
built from the public format descriptions, with the real class lists): every test image is paired with
its true class, no training image is evaluated, the count is checked against the published test size,
and a layout that cannot be verified is refused, never evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from set_replicas import BUILDERS, Replica

from cloob.errors import CloobError
from cloob.evaluate.datasets import open_classification_set
from cloob.evaluate.sets.manifest import read_items, read_manifest
from cloob.evaluate.sets.prepare import prepare_downstream
from cloob.evaluate.sets.spec import load_downstream_spec, normalize
from cloob.storage import Location

# replica -> the shipped spec that reads it
SETS = {
    "birdsnap_download": "birdsnap", "birdsnap_download_zip": "birdsnap",
    "stanford_cars_class_folders": "stanford_cars", "stanford_cars_devkit": "stanford_cars",
    "flowers102_official": "flowers102", "flowers102_official_tgz": "flowers102",
    "gtsrb_final_test": "gtsrb", "gtsrb_full": "gtsrb",
    "ucf101_coop_midframes": "ucf101", "ucf101_official_lists": "ucf101",
    "imagenet_val_devkit_targz": "imagenet", "imagenet_val_devkit_folder": "imagenet",
    "imagenet_kaggle": "imagenet", "imagenet_val_wnid_folders": "imagenet",
    "imagenetv2_matched_frequency": "imagenet_v2", "country211": "country211",
}
REFUSED = {"gtsrb_final_training": "gtsrb", "flowers102_flower_data": "flowers102"}


def test_every_replica_is_covered():
    assert set(SETS) | set(REFUSED) == set(BUILDERS)


def _official_to_spec(spec, rep: Replica) -> list[int]:
    """The spec's class index of each official class index. The specs list their classes in the official
    label order, except UCF101 (the CLOOB reference code's order), mapped here by name."""
    if spec.name != "ucf101":
        assert len(rep.class_names) == len(spec.classes)
        return list(range(len(spec.classes)))
    keys = {normalize(c, "alnum_casefold"): i for i, c in enumerate(spec.classes)}
    return [keys[normalize(n, "alnum_casefold")] for n in rep.class_names]


def _prepared_pairs(out: Path, name: str, top: str) -> dict[str, int]:
    """{image path relative to the replica's top folder: class index} of the prepared set."""
    m = read_manifest(str(out), name)
    items = read_items(Location(str(out)).sub(name), m)
    pre = "" if top in ("", ".") else top.rstrip("/") + "/"
    assert all(p.startswith(pre) for p, _ in items), (pre, items[:3])
    return {p[len(pre):]: c for p, c in items}


@pytest.mark.parametrize("replica", sorted(SETS))
def test_every_test_image_is_paired_with_its_true_class(replica, tmp_path):
    rep = BUILDERS[replica](tmp_path / "src")
    spec = load_downstream_spec(SETS[replica])
    out = tmp_path / "out"
    s = prepare_downstream(spec, str(out), source=str(rep.source), progress=False, cache_dir=tmp_path / "cache")
    # a zip holds one top folder (birdsnap.zip -> birdsnap/); the truth is relative to it
    top = rep.source.stem if rep.source.suffix == ".zip" else "."
    got = _prepared_pairs(out, spec.name, top)
    to_spec = _official_to_spec(spec, rep)
    want = {p: to_spec[c] for p, c in rep.truth.items()}
    assert got == want  # every class's pairing and the split: nothing else evaluated
    assert s["images"] == rep.test_images and s["classes"] == len(spec.classes)
    m = read_manifest(str(out), spec.name)
    assert all(c["how"] and c["source"] != "" for c in m["classes"])  # how each class was paired
    assert m["split"]["left_out"] >= 0 and m["expected_images"] == spec.test_size
    # a replica is far smaller than the published test split: said in the manifest, with the numbers
    assert any(f"{rep.test_images} images where the published test split has {spec.test_size}" in w
               for w in m["warnings"])
    if rep.source.is_dir():  # cloob evaluate --data reads the folder through the same code
        ds = open_classification_set(spec, str(rep.source))
        assert len(ds.items) == rep.test_images and ds.warnings == m["warnings"]
        assert sorted(c for _, c in ds.items) == sorted(want.values())


def test_sorted_and_official_order_differ_where_they_do_in_reality(tmp_path):
    """The replicas would catch a positional pairing: folders in sorted order are not the class order."""
    cars = BUILDERS["stanford_cars_class_folders"](tmp_path / "cars")
    names = cars.class_names
    assert sum(a != b for a, b in zip(sorted(names), names)) == 143
    bird = BUILDERS["birdsnap_download"](tmp_path / "bird")
    folders = sorted({p.split("/")[-2] for p in bird.truth})
    spec = load_downstream_spec("birdsnap")
    in_order = [normalize(c, "alnum_casefold") for c in spec.classes]
    assert sum(normalize(f, "alnum_casefold") == c for f, c in zip(folders, in_order)) == 2  # 498 of 500 differ
    assert _official_to_spec(load_downstream_spec("ucf101"), BUILDERS["ucf101_coop_midframes"](tmp_path / "u")) != \
        list(range(101))


def test_the_training_set_is_refused_as_a_test_set(tmp_path):
    rep = BUILDERS["gtsrb_final_training"](tmp_path / "src")
    with pytest.raises(CloobError) as e:
        prepare_downstream("gtsrb", str(tmp_path / "out"), source=str(rep.source), progress=False)
    assert "'train' split" in str(e.value) and "not its 'test' split" in str(e.value)
    assert "GT-final_test.csv" in e.value.fix
    assert read_manifest(str(tmp_path / "out"), "gtsrb") is None


def test_a_copy_without_the_test_split_is_refused_or_read_on_request_and_flagged(tmp_path):
    rep = BUILDERS["flowers102_flower_data"](tmp_path / "src")
    with pytest.raises(CloobError) as e:
        prepare_downstream("flowers102", str(tmp_path / "out"), source=str(rep.source), progress=False)
    assert "'train', 'valid' split(s)" in str(e.value) and "--split flowers102=valid" in e.value.fix
    assert "setid.mat" in e.value.fix  # the official files are named
    s = prepare_downstream("flowers102", str(tmp_path / "out"), source=str(rep.source), split="valid", progress=False)
    assert s["images"] == rep.test_images and s["split"]["name"] == "valid"
    got = _prepared_pairs(tmp_path / "out", "flowers102", ".")
    assert got == rep.truth  # folder k is the 1-based label k: class k - 1
    assert any("'valid' split, not the published 'test' split" in w for w in s["warnings"])


def test_label_files_that_do_not_verify_are_refused(tmp_path):
    import scipy.io

    # Stanford Cars: a cars_meta.mat whose names are not the spec's (another dataset's devkit)
    rep = BUILDERS["stanford_cars_devkit"](tmp_path / "cars")
    meta = next(rep.source.rglob("cars_meta.mat"))
    m = scipy.io.loadmat(meta)
    m["class_names"][0, 5] = "Some Other Car 1999"
    scipy.io.savemat(meta, {"class_names": m["class_names"]})
    with pytest.raises(CloobError, match="1 class names in .*cars_meta.mat name no class of the spec: 6: 'Some Other"):
        prepare_downstream("stanford_cars", str(tmp_path / "o1"), source=str(rep.source), progress=False)
    # GTSRB: the unlabelled test list alone
    rep = BUILDERS["gtsrb_final_test"](tmp_path / "gtsrb")
    gt = next(rep.source.rglob("GT-final_test.csv"))
    gt.write_text(gt.read_text().replace(";ClassId", "").replace("\r\n", "\n"))
    with pytest.raises(CloobError, match="no ClassId column"):
        prepare_downstream("gtsrb", str(tmp_path / "o2"), source=str(rep.source), progress=False)
    # UCF101: CoOp's split file names another class for an image than its folder does
    rep = BUILDERS["ucf101_coop_midframes"](tmp_path / "ucf")
    split = rep.source / "split_zhou_UCF101.json"
    data = json.loads(split.read_text())
    data["test"][0][2] = "Archery"
    split.write_text(json.dumps(data))
    with pytest.raises(CloobError, match="gives .* the class 'Archery', but its folder pairs it with"):
        prepare_downstream("ucf101", str(tmp_path / "o3"), source=str(rep.source), progress=False)


def test_prepare_downstream_prints_the_pairs_and_the_warnings(tmp_path, capsys):
    from cloob.cli import main

    rep = BUILDERS["stanford_cars_class_folders"](tmp_path / "src")
    assert main(["prepare-downstream", "stanford_cars", "--out", str(tmp_path / "out"), "--source",
                 f"stanford_cars={rep.source}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "'AM General Hummer SUV 2000' <- AM General Hummer SUV 2000 (folder name)" in out
    assert "test split by folder 'car_data/car_data/test'" in out and "196 images of other splits left out" in out
    assert "warning: 196 images where the published test split has 8041" in out
    m = read_manifest(str(tmp_path / "out"), "stanford_cars")
    ram = next(c for c in m["classes"] if c["name"] == "Ram C/V Cargo Van Minivan 2012")
    assert ram["source"] == "Ram C-V Cargo Van Minivan 2012" and ram["how"] == "folder name"


def test_a_birdsnap_test_only_copy_made_from_test_images_txt(tmp_path):
    """The copy users make from the download: test/<Common_Name>/ holding only the listed test images."""
    import shutil

    rep = BUILDERS["birdsnap_download"](tmp_path / "src")
    copy = tmp_path / "birdsnap_test"
    for rel in rep.truth:  # download/images/<Folder>/<file>
        dest = copy / "test" / Path(rel).parent.name / Path(rel).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rep.source / rel, dest)
    s = prepare_downstream("birdsnap", str(tmp_path / "out"), source=str(copy), progress=False)
    got = _prepared_pairs(tmp_path / "out", "birdsnap", "test")
    assert got == {"/".join(Path(p).parts[-2:]): c for p, c in rep.truth.items()}
    assert s["split"]["by"] == "folder 'test'" and s["classes"] == 500


def test_a_gif_in_birdsnaps_test_list_is_evaluated(tmp_path):
    """test_images.txt names Great_Crested_Flycatcher/541314.gif among its 2,443 test images."""
    from PIL import Image

    rep = BUILDERS["birdsnap_download"](tmp_path / "src")
    gif = rep.source / "download" / "images" / "Great_Crested_Flycatcher" / "541314.gif"
    assert "Great_Crested_Flycatcher/541314.gif" in (rep.source / "test_images.txt").read_text()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(gif, "GIF")
    prepare_downstream("birdsnap", str(tmp_path / "out"), source=str(rep.source), progress=False)
    got = _prepared_pairs(tmp_path / "out", "birdsnap", ".")
    spec = load_downstream_spec("birdsnap")
    assert got["download/images/Great_Crested_Flycatcher/541314.gif"] == spec.classes.index("Great Crested Flycatcher")
    assert len(got) == rep.test_images + 1


def test_a_replica_whose_folders_cannot_be_verified_is_refused_not_evaluated(tmp_path):
    """Birdsnap's test-only copy with its folders renamed 000..499 (an undocumented naming): refused."""
    import shutil

    rep = BUILDERS["birdsnap_download"](tmp_path / "src")
    folders = sorted({Path(p).parent.name for p in rep.truth})
    copy = tmp_path / "numbered" / "test"
    for p in rep.truth:
        dest = copy / f"{folders.index(Path(p).parent.name):03d}" / Path(p).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rep.source / p, dest)
    with pytest.raises(CloobError) as e:
        prepare_downstream("birdsnap", str(tmp_path / "out"), source=str(copy.parent), progress=False)
    assert "do not name birdsnap's classes" in str(e.value) and "'000' -> 'Coopers Hawk'" in str(e.value)
    assert read_manifest(str(tmp_path / "out"), "birdsnap") is None
    with pytest.raises(CloobError, match="do not name birdsnap's classes"):
        open_classification_set("birdsnap", str(copy.parent))  # cloob evaluate --data refuses it too
