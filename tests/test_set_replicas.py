"""Self-test of tests/set_replicas.py: each replica checked against the real formats, independently of the
product (torchvision's own dataset classes where they accept the layout, scipy for the .mat files, the csv
and json modules for the rest), and the traps it is meant to carry (official order != sorted order) are
shown to be there. Builds every replica once (~2 s)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import scipy.io as sio

sys.path.insert(0, str(Path(__file__).parent))
import set_replicas as sr  # noqa: E402


@pytest.fixture(scope="module")
def reps(tmp_path_factory):
    return sr.build_all(tmp_path_factory.mktemp("replicas"))


def _unzip(path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(path) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        assert len(tops) == 1, tops
        z.extractall(dest)
    return dest / tops.pop()


def _untar(path: Path, dest: Path) -> None:
    with tarfile.open(path) as t:
        t.extractall(dest, filter="data")


# -------------------------------------------------------------------------------------- generic invariants

@pytest.mark.parametrize("name", list(sr.BUILDERS))
def test_replica_invariants(reps, name, tmp_path):
    r = reps[name]
    top = r.source
    if top.suffix == ".zip":
        top = _unzip(top, tmp_path)
    elif any(top.rglob("*.t*gz")):  # archives lying inside the folder count as unpacked in place
        top = Path(shutil.copytree(top, tmp_path / top.name))
        for p in list(top.rglob("*.t*gz")):
            _untar(p, p.parent)
    files = sr.image_files(top)
    assert len(files) == r.test_images + r.train_images
    assert r.test_images == len(r.truth)
    assert set(r.truth) <= set(files)
    assert all(0 <= c < len(r.class_names) for c in r.truth.values())
    if r.truth:  # every class has a test image
        assert set(r.truth.values()) == set(range(len(r.class_names)))
    assert not r.class_ids or len(r.class_ids) == len(r.class_names)
    digests = [hashlib.md5((top / f).read_bytes()).hexdigest() for f in files]
    assert len(set(digests)) == len(digests), "images are not distinct"
    assert r.layout


# ------------------------------------------------------------------------------------------------ Birdsnap

def _birdsnap_truth_from_files(top: Path) -> dict[str, int]:
    """The test split as the archive defines it: test_images.txt's paths, species from images.txt, images
    where get_birdsnap.py saves them (download/images/<path>)."""
    tests = (top / "test_images.txt").read_text().splitlines()
    assert tests[0] == "path"
    with open(top / "images.txt", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    species = {r["path"]: int(r["species_id"]) for r in rows}
    return {f"download/images/{p}": species[p] - 1 for p in tests[1:] if (top / "download/images" / p).is_file()}


@pytest.mark.parametrize("name", ["birdsnap_download", "birdsnap_download_zip"])
def test_birdsnap(reps, name, tmp_path):
    r = reps[name]
    top = _unzip(r.source, tmp_path) if r.source.suffix == ".zip" else r.source
    assert top.name == "birdsnap"
    lines = (top / "species.txt").read_text().splitlines()
    assert lines[0].split("\t") == ["id", "common", "scientific", "dir"]
    rows = [ln.split("\t") for ln in lines[1:]]
    assert [int(x[0]) for x in rows] == list(range(1, 501))
    assert rows[0] == ["1", "Cooper's Hawk", "Accipiter cooperii", "coopers_hawk"]
    assert [x[1] for x in rows] == r.class_names
    assert len((top / "test_images.txt").read_text().splitlines()) == 2444  # header + 2443
    # image folders are images.txt's path folders; species.txt's dir is their lower-case form
    folders = sorted(p.name for p in (top / "download/images").iterdir())
    assert len(folders) == 500 and {f.lower() for f in folders} == {x[3] for x in rows}
    assert "Coopers_Hawk" in folders and "Harriss_Hawk" in folders and "Sharp_shinned_Hawk" in folders
    with open(top / "images.txt", newline="") as f:
        header = next(csv.reader(f, delimiter="\t"))
    assert header[:8] == ["url", "md5", "path", "species_id", "bb_x1", "bb_y1", "bb_x2", "bb_y2"]
    assert header[-2:] == ["throat_x", "throat_y"] and len(header) == 8 + 2 * 17
    assert _birdsnap_truth_from_files(top) == r.truth
    # train images are present and must not be evaluated
    assert (top / "download/images/Coopers_Hawk/0005.jpg").is_file()
    assert "download/images/Coopers_Hawk/0005.jpg" not in r.truth
    # the trap: numbering folders in sorted order pairs 498 of 500 classes with another class's folder
    by_sorted = {f: i for i, f in enumerate(folders)}
    official = {r.class_ids[i]: i for i in range(500)}
    assert sum(by_sorted[f] != official[f] for f in folders) == 498


# ------------------------------------------------------------------------------------------- Stanford Cars

def test_stanford_cars_devkit_torchvision(reps):
    from torchvision.datasets import StanfordCars

    r = reps["stanford_cars_devkit"]
    ds = StanfordCars(r.source.parent, split="test")
    got = {Path(p).relative_to(r.source).as_posix(): int(c) for p, c in ds._samples}
    assert got == r.truth
    assert ds.classes == r.class_names
    assert len(StanfordCars(r.source.parent, split="train")) == r.train_images
    # the .mat structures read back like the real files (uint8/uint16 per value, (1, N) struct array)
    ann = sio.loadmat(r.source / "cars_test_annos_withlabels.mat")["annotations"]
    assert ann.shape == (1, 196)
    assert ann.dtype.names == ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    assert ann[0, 0]["class"].dtype.kind == "u" and ann[0, 0]["fname"][0] == "00001.jpg"
    assert sio.loadmat(r.source / "devkit/cars_test_annos.mat")["annotations"].dtype.names == (
        "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname")
    meta = sio.loadmat(r.source / "devkit/cars_meta.mat")["class_names"]
    assert meta.shape == (1, 196) and meta[0, 0][0] == "AM General Hummer SUV 2000"


def test_stanford_cars_class_folders(reps):
    r = reps["stanford_cars_class_folders"]
    names = (r.source / "names.csv").read_text().splitlines()
    assert names == r.class_names and "Ram C/V Cargo Van Minivan 2012" in names
    rows = sr.read_csv_rows(r.source / "anno_test.csv")
    assert all(len(x) == 6 for x in rows) and not rows[0][0].startswith("Filename")
    got = {}
    for fname, *_bbox, cls in rows:
        folder = names[int(cls) - 1].replace("/", "-")
        rel = f"car_data/car_data/test/{folder}/{fname}"
        assert (r.source / rel).is_file()
        got[rel] = int(cls) - 1
    assert got == r.truth
    assert (r.source / "car_data/car_data/test/Ram C-V Cargo Van Minivan 2012").is_dir()
    # the trap: sorted folder order differs from the official (cars_meta) order for 143 of 196 classes
    folders = sorted(p.name for p in (r.source / "car_data/car_data/test").iterdir())
    assert sum(f != n.replace("/", "-") for f, n in zip(folders, names)) == 143


# ------------------------------------------------------------------------------------------------ Flowers102

def _flowers_torchvision(root: Path, monkeypatch):
    import torchvision.datasets.flowers102 as f102

    # the replica's .mat files are not the published ones: skip only the md5 comparison
    monkeypatch.setattr(f102, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    return f102.Flowers102(root, split="test"), f102.Flowers102(root, split="train"), f102.Flowers102(root, split="val")


def test_flowers102_official_torchvision(reps, monkeypatch):
    r = reps["flowers102_official"]
    test, train, val = _flowers_torchvision(r.source.parent, monkeypatch)
    got = {p.relative_to(r.source).as_posix(): int(c) for p, c in zip(test._image_files, test._labels)}
    assert got == r.truth
    assert len(train) + len(val) == r.train_images
    labels = sio.loadmat(r.source / "imagelabels.mat")["labels"]
    assert labels.dtype.name == "uint8" and labels.shape[0] == 1 and labels.min() == 1
    setid = sio.loadmat(r.source / "setid.mat")
    assert {k for k in setid if not k.startswith("__")} == {"trnid", "valid", "tstid"}
    assert all(setid[k].dtype.name == "uint16" and setid[k].shape[0] == 1 for k in ("trnid", "valid", "tstid"))
    assert list(setid["tstid"][0]) != sorted(setid["tstid"][0])  # not sorted, like the real file


def test_flowers102_tgz(reps, monkeypatch, tmp_path):
    r = reps["flowers102_official_tgz"]
    assert sorted(p.name for p in r.source.iterdir()) == ["102flowers.tgz", "imagelabels.mat", "setid.mat"]
    with tarfile.open(r.source / "102flowers.tgz") as t:
        assert all(n == "jpg" or n.startswith("jpg/image_") for n in t.getnames())
    base = tmp_path / "flowers-102"
    base.mkdir()
    _untar(r.source / "102flowers.tgz", base)
    for f in ("imagelabels.mat", "setid.mat"):
        (base / f).write_bytes((r.source / f).read_bytes())
    test, _, _ = _flowers_torchvision(tmp_path, monkeypatch)
    assert {p.relative_to(base).as_posix(): int(c) for p, c in zip(test._image_files, test._labels)} == r.truth


def test_flowers102_flower_data(reps):
    r = reps["flowers102_flower_data"]
    c2n = json.loads((r.source / "cat_to_name.json").read_text())
    assert list(c2n)[:3] == ["21", "3", "45"] and len(c2n) == 102
    assert [c2n[str(i)] for i in range(1, 103)] == r.class_names
    assert sorted(p.name for p in r.source.iterdir()) == ["cat_to_name.json", "train", "valid"]
    got = {p.relative_to(r.source).as_posix(): int(p.parent.name) - 1 for p in (r.source / "valid").rglob("*.jpg")}
    assert got == r.truth
    assert all(re.fullmatch(r"image_\d{5}\.jpg", Path(k).name) for k in r.truth)
    folders = sorted(p.name for p in (r.source / "valid").iterdir())
    assert folders[:3] == ["1", "10", "100"]  # the trap: string order is not label order


# ---------------------------------------------------------------------------------------------------- GTSRB

@pytest.mark.parametrize("name", ["gtsrb_final_test", "gtsrb_full"])
def test_gtsrb_torchvision(reps, name):
    from torchvision.datasets import GTSRB

    r = reps[name]
    ds = GTSRB(r.source.parent, split="test")
    assert {Path(p).relative_to(r.source).as_posix(): c for p, c in ds._samples} == r.truth
    with open(r.source / "GT-final_test.csv", newline="") as f:
        assert f.readline() == "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n"
    with open(r.source / "GTSRB/Final_Test/Images/GT-final_test.test.csv", newline="") as f:
        assert f.readline().rstrip("\r\n").split(";")[-1] == "Roi.Y2"
    assert all(re.fullmatch(r"GTSRB/Final_Test/Images/\d{5}\.ppm", k) for k in r.truth)


@pytest.mark.parametrize("name", ["gtsrb_final_training", "gtsrb_full"])
def test_gtsrb_training(reps, name):
    r = reps[name]
    base = r.source / "GTSRB/Final_Training/Images"
    assert sorted(p.name for p in base.iterdir()) == [f"{i:05d}" for i in range(43)]
    n = 0
    for folder in base.iterdir():
        rows = sr.read_csv_rows(folder / f"GT-{folder.name}.csv", delimiter=";")
        assert rows[0] == ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
        assert all(int(x[-1]) == int(folder.name) and (folder / x[0]).is_file() for x in rows[1:])
        n += len(rows) - 1
    assert n == r.train_images
    assert not any(k.startswith("GTSRB/Final_Training") for k in r.truth)


# --------------------------------------------------------------------------------------------------- UCF101

def test_ucf101_coop(reps):
    r = reps["ucf101_coop_midframes"]
    text = (r.source / "split_zhou_UCF101.json").read_text()
    split = json.loads(text)
    assert list(split) == ["train", "val", "test"]
    assert text.startswith('{\n    "train": [\n        [\n            "')  # Dassl write_json: indent=4
    classind = r.class_names
    got = {}
    for impath, label, cname in split["test"]:
        assert (r.source / "UCF-101-midframes" / impath).is_file()
        assert cname == "_".join(re.findall("[A-Z][^A-Z]*", classind[label])) == impath.split("/")[0]
        got[f"UCF-101-midframes/{impath}"] = label
    assert got == r.truth
    assert len(split["train"]) + len(split["val"]) == r.train_images
    assert (r.source / "UCF-101-midframes/Handstand_Pushups/v_HandStandPushups_g01_c01.jpg").is_file()
    assert "UCF-101-midframes/Yo_Yo/v_YoYo_g01_c01.jpg" in r.truth


def test_ucf101_official_lists(reps):
    r = reps["ucf101_official_lists"]
    lists = r.source / "ucfTrainTestlist"
    classind = [ln.split(" ") for ln in (lists / "classInd.txt").read_text().splitlines()]
    assert (lists / "classInd.txt").read_bytes().startswith(b"1 ApplyEyeMakeup\r\n")
    assert classind[0] == ["1", "ApplyEyeMakeup"] and classind[36] == ["37", "HandstandPushups"] and len(classind) == 101
    index = {name: int(i) - 1 for i, name in classind}
    got = {}
    for line in (lists / "testlist01.txt").read_text().splitlines():
        assert line.endswith(".avi") and " " not in line
        rel = "UCF-101/" + line[:-4] + ".jpg"
        got[rel] = index[line.split("/")[0]]
    assert got == r.truth and all((r.source / k).is_file() for k in got)
    train = [ln.split(" ") for ln in (lists / "trainlist01.txt").read_text().splitlines()]
    assert all(index[p.split("/")[0]] == int(lab) - 1 for p, lab in train)
    assert "HandstandPushups/v_HandStandPushups_g01_c01.avi" in (lists / "testlist01.txt").read_text()
    test01 = (lists / "testlist01.txt").read_text().splitlines()
    assert set((lists / "testlist02.txt").read_text().splitlines()).isdisjoint(test01)
    # the trap: sorted class names are not classInd order (HammerThrow < Hammering, JumpRope < JumpingJack)
    names = [n for _, n in classind]
    assert sum(a != b for a, b in zip(sorted(names), names)) == 4


# -------------------------------------------------------------------------------------------------- ImageNet

def test_imagenet_id_order_facts():
    """The devkit's ILSVRC2012_ID order (map_clsloc.txt) is not sorted-wnid order; anchors cross-checked with a
    second public source (tench is ID 449 / index 0, sea snake ID 490 / index 65, val image 1 is a sea snake)."""
    ids = sr.imagenet_devkit_ids()
    wnids = [w for w, _ in sr.imagenet_synsets()]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000 and set(ids) == set(wnids)
    assert sorted(ids.values()) == list(range(1, 1001))
    assert ids["n02119789"] == 1 and ids["n01440764"] == 449 and ids["n01751748"] == 490
    assert wnids.index("n01751748") == 65
    assert sum(ids[w] != i + 1 for i, w in enumerate(wnids)) > 990


def _check_devkit(dk: Path, val_dir: Path, r) -> None:
    meta = sio.loadmat(dk / "data/meta.mat")["synsets"]
    assert meta.dtype.names == ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                "wordnet_height", "num_train_images")
    assert meta.shape[1] == 1
    ids = [int(m["ILSVRC2012_ID"][0][0][0]) for m in meta]
    assert ids == sorted(ids) and ids[:1000] == list(range(1, 1001)) and 1001 in ids
    assert all(int(m["num_children"][0][0][0]) == 0 for m in meta[:1000])
    id_to_wnid = {int(m["ILSVRC2012_ID"][0][0][0]): str(m["WNID"][0][0]) for m in meta}
    gt = (dk / "data/ILSVRC2012_validation_ground_truth.txt").read_text().splitlines()
    files = sorted(p.name for p in val_dir.iterdir())
    assert len(files) == len(gt)
    got = {f"{val_dir.name}/{f}": r.class_ids.index(id_to_wnid[int(i)]) for f, i in zip(files, gt)}
    assert got == r.truth


def test_imagenet_devkit_targz_torchvision(reps, tmp_path, monkeypatch):
    import torchvision.datasets.imagenet as tvi

    r = reps["imagenet_val_devkit_targz"]
    assert sorted(p.name for p in r.source.iterdir()) == ["ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_val"]
    work = tmp_path / "tv"
    work.mkdir()
    (work / "ILSVRC2012_devkit_t12.tar.gz").write_bytes((r.source / "ILSVRC2012_devkit_t12.tar.gz").read_bytes())
    monkeypatch.setattr(tvi, "_verify_archive", lambda *a, **k: None)  # not the published archive: skip md5 only
    tvi.parse_devkit_archive(str(work))
    wnid_to_classes, val_wnids = tvi.load_meta_file(str(work))
    files = sorted(p.name for p in (r.source / "ILSVRC2012_img_val").iterdir())
    got = {f"ILSVRC2012_img_val/{f}": r.class_ids.index(w) for f, w in zip(files, val_wnids)}
    assert got == r.truth
    assert len(wnid_to_classes) == 1000 and wnid_to_classes["n01440764"] == ("tench", "Tinca tinca")
    _untar(r.source / "ILSVRC2012_devkit_t12.tar.gz", tmp_path)
    _check_devkit(tmp_path / "ILSVRC2012_devkit_t12", r.source / "ILSVRC2012_img_val", r)


def test_imagenet_devkit_folder(reps):
    r = reps["imagenet_val_devkit_folder"]
    _check_devkit(r.source / "ILSVRC2012_devkit_t12", r.source / "ILSVRC2012_img_val", r)


def test_imagenet_kaggle(reps):
    r = reps["imagenet_kaggle"]
    mapping = [ln.split(" ", 1) for ln in (r.source / "LOC_synset_mapping.txt").read_text().splitlines()]
    assert mapping[0] == ["n01440764", "tench, Tinca tinca"] and [w for w, _ in mapping] == r.class_ids
    index = {w: i for i, (w, _) in enumerate(mapping)}
    with open(r.source / "LOC_val_solution.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ImageId", "PredictionString"]
    got = {}
    for row in rows:
        toks = row["PredictionString"].split()
        assert len(toks) % 5 == 0 and len({toks[i] for i in range(0, len(toks), 5)}) == 1
        got[f"ILSVRC/Data/CLS-LOC/val/{row['ImageId']}.JPEG"] = index[toks[0]]
    assert got == r.truth
    assert [row["ImageId"] for row in rows] != sorted(row["ImageId"] for row in rows)
    assert any((r.source / "ILSVRC/Data/CLS-LOC/test").iterdir())


def test_imagenet_wnid_folders_torchvision(reps):
    from torchvision.datasets import ImageFolder

    r = reps["imagenet_val_wnid_folders"]
    ds = ImageFolder(r.source)
    assert ds.classes == r.class_ids
    assert {Path(p).relative_to(r.source).as_posix(): c for p, c in ds.samples} == r.truth


def test_imagenetv2(reps):
    r = reps["imagenetv2_matched_frequency"]
    got = {p.relative_to(r.source).as_posix(): int(p.parent.name) for p in r.source.rglob("*.jpeg")}
    assert got == r.truth
    folders = sorted(p.name for p in r.source.iterdir())
    assert folders[:3] == ["0", "1", "10"]  # string order is not class order


# ------------------------------------------------------------------------------------------------ Country211

def test_country211_torchvision(reps):
    from torchvision.datasets import Country211

    r = reps["country211"]
    ds = Country211(r.source.parent, split="test")
    assert ds.classes == r.class_names
    assert {Path(p).relative_to(r.source).as_posix(): c for p, c in ds.samples} == r.truth


# -------------------------------------------------------------------------------------- spec comparisons

def test_class_lists_match_published_counts():
    assert len(sr.birdsnap_species()) == 500 and len(sr.birdsnap_test_paths()) == 2443
    assert Counter(p.split("/")[0] for p in sr.birdsnap_test_paths()).most_common(1)[0][1] == 5
    assert len(sr.stanford_cars_classes()) == 196 and len(sr.ucf101_classind()) == 101
    assert len(sr.flowers102_classes()) == 102 and len(sr.country211_codes()) == 211
