"""Tiny, structurally exact replicas of zero-shot evaluation sets in the layouts users really have.

Each `build_<set>_<layout>(root)` writes one replica under `root` and returns a `Replica`: what a user
would pass (`source`), the ground truth of every TEST image present (`truth`, path -> class index in
the dataset's official label order, 0-based), the official class names in that order, and counts.
Images are 16x16 pictures drawn with PIL, distinct per image; a few per class. Class lists, file
names, label-file structures (.mat variable names, struct fields, dtypes; CSV separators and headers;
CoOp's JSON) follow the real datasets; the facts and their sources are in tests/data/sets/README.md
and the research notes. Nothing here reads the product (cloob/): the replicas are the reference the
product is tested against, and tests/test_set_replicas.py checks them against the formats (and
torchvision's own dataset classes where those accept the layout).

`truth` keys are '/'-separated paths relative to the replica's top folder: `source` itself when it is
a folder; for a zip, the single folder the zip holds (birdsnap.zip -> birdsnap/); a .tgz/.tar.gz
lying inside `source` counts as unpacked in place (102flowers.tgz -> jpg/...).

ImageNet: the label order is the standard ILSVRC class index (wnids in sorted order, the order of
the Kaggle LOC_synset_mapping.txt, torchvision, open_clip and ImageNetV2's folders 0..999), NOT the
devkit's ILSVRC2012_ID order, which the devkit's ground-truth file uses (1..1000, not sorted by wnid).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).parent / "data" / "sets"

__all__ = ["Replica", "BUILDERS", "build_all"]


@dataclass
class Replica:
    source: Path                  # what a user passes: the folder, or the archive
    truth: dict[str, int]         # every TEST image present -> official class index (0-based)
    class_names: list[str]        # official names in label order, as the dataset's own files write them
    test_images: int              # == len(truth)
    train_images: int             # images present that must NOT be evaluated (train, val, unlabelled test)
    layout: str                   # one line
    class_ids: list[str] = field(default_factory=list)  # the dataset's own ids in label order, where it has them
    notes: str = ""


# --------------------------------------------------------------------------------------------- helpers

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".ppm": "PPM"}


def _image_bytes(key: str, ext: str) -> bytes:
    """A 16x16 picture, distinct per key: two colours and a block position taken from md5(key)."""
    h = hashlib.md5(key.encode()).digest()
    im = Image.new("RGB", (16, 16), (h[0], h[1], h[2]))
    x, y = (h[6] % 3) * 4, (h[7] % 3) * 4
    im.paste((h[3], h[4], h[5]), (x, y, x + 8, y + 8))
    im.putpixel((15, 15), (h[8], h[9], h[10]))
    buf = io.BytesIO()
    fmt = _FORMATS[ext.lower()]
    if fmt == "JPEG":
        im.save(buf, fmt, quality=95)
    elif fmt == "GIF":
        im.convert("P").save(buf, fmt)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def _img(top: Path, rel: str, tag: str = "") -> bytes:
    """Write an image at top/rel (format from the extension); returns its bytes."""
    p = top / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    data = _image_bytes(f"{tag}|{rel}", p.suffix)
    p.write_bytes(data)
    return data


def _write(p: Path, text: str, newline: str = "\n") -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline=newline) as f:
        f.write(text)


def _zip_dir(folder: Path, dest: Path) -> None:
    """Zip `folder` with its own name as the single top-level folder (dirs as entries too)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        z.write(folder, folder.name + "/")
        for p in sorted(folder.rglob("*")):
            arc = p.relative_to(folder.parent).as_posix()
            z.write(p, arc + "/" if p.is_dir() else arc)


def _tar_gz(members_root: Path, names: list[str], dest: Path) -> None:
    with tarfile.open(dest, "w:gz") as t:
        for n in names:
            t.add(members_root / n, arcname=n)


def _savemat(path: Path, variables: dict) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, variables, do_compression=True)


def _uint(v: int) -> np.ndarray:
    """A MATLAB double as the real devkits store it on disk: the smallest unsigned integer type (1x1)."""
    return np.array([[v]], dtype=np.uint8 if v < 256 else np.uint16)


def _cell_row(strings: list[str]) -> np.ndarray:
    a = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        a[0, i] = np.array([s])
    return a


def _rng(name: str) -> random.Random:
    return random.Random(name)


# -------------------------------------------------------------------------------------------- class lists

def birdsnap_species() -> list[dict[str, str]]:
    """Birdsnap 1.1 species.txt (tab-separated, header id/common/scientific/dir), 500 rows in id order."""
    lines = (DATA / "birdsnap_species.txt").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]


def birdsnap_test_paths() -> list[str]:
    """Birdsnap 1.1 test_images.txt: header `path`, then 2443 paths (from images.txt's path column)."""
    lines = (DATA / "birdsnap_test_images.txt").read_text().splitlines()
    assert lines[0] == "path"
    return lines[1:]


def stanford_cars_classes() -> list[str]:
    return (DATA / "stanford_cars_class_names.txt").read_text().splitlines()


def ucf101_classind() -> list[str]:
    rows = [ln.split(" ") for ln in (DATA / "ucf101_classInd.txt").read_text().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, 102))
    return [r[1] for r in rows]


def imagenet_synsets() -> list[tuple[str, str]]:
    """(wnid, words) in the standard class order (sorted wnids; the Kaggle LOC_synset_mapping.txt)."""
    out = []
    for ln in (DATA / "imagenet_LOC_synset_mapping.txt").read_text().splitlines():
        wnid, words = ln.split(" ", 1)
        out.append((wnid, words))
    return out


def imagenet_devkit_ids() -> dict[str, int]:
    """wnid -> ILSVRC2012_ID (1..1000) of the ILSVRC2012 devkit's meta.mat."""
    rows = (DATA / "imagenet_devkit_ids.tsv").read_text().splitlines()[1:]
    return {wnid: int(i) for i, wnid in (r.split("\t") for r in rows)}


def flowers102_cat_to_name() -> dict[str, str]:
    return json.loads((DATA / "flowers102_cat_to_name.json").read_text())


def flowers102_classes() -> list[str]:
    c2n = flowers102_cat_to_name()
    return [c2n[str(i)] for i in range(1, 103)]


def country211_codes() -> list[str]:
    return (DATA / "country211_codes.txt").read_text().splitlines()


def gtsrb_classes() -> list[str]:
    """GTSRB's files name classes only by ClassId (0..42; folders 00000..00042)."""
    return [str(i) for i in range(43)]


# ------------------------------------------------------------------------------------------------ Birdsnap

_BIRDSNAP_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left_cheek", "left_eye", "left_leg",
                   "left_wing", "nape", "right_cheek", "right_eye", "right_leg", "right_wing", "tail", "throat"]
# Real training-image paths from the archive's all-ims (not in test_images.txt), incl. a .png and a .gif.
_BIRDSNAP_TRAIN = ["Coopers_Hawk/0005.jpg", "Acadian_Flycatcher/534067.jpg", "Black_and_white_Warbler/346859.jpg",
                   "Harriss_Hawk/28678.jpg", "Allens_Hummingbird/513855.png", "Northern_Shrike/285742.gif"]


def _birdsnap_tree(top: Path) -> Replica:
    species = birdsnap_species()
    tests = birdsnap_test_paths()
    folder_of = {}  # species.txt's dir (lower case) -> the folder images.txt's paths use (e.g. Coopers_Hawk)
    for p in tests:
        folder_of.setdefault(p.split("/")[0].lower(), p.split("/")[0])
    sid_of_folder = {folder_of[s["dir"]]: int(s["id"]) for s in species}
    first_test = {}
    for p in tests:
        first_test.setdefault(p.split("/")[0], p)
    present_test = [first_test[folder_of[s["dir"]]] for s in species]  # one test image per species, id order
    present = set(present_test) | set(_BIRDSNAP_TRAIN)

    shutil.copyfile(DATA / "birdsnap_species.txt", top / "species.txt")
    shutil.copyfile(DATA / "birdsnap_test_images.txt", top / "test_images.txt")
    img_root = top / "download" / "images"
    md5 = {}
    for p in sorted(present):
        md5[p] = hashlib.md5(_img(img_root, p, "birdsnap")).hexdigest()
    (top / "download" / "temp").mkdir(parents=True)
    rows = sorted(set(tests) | present, key=lambda p: (sid_of_folder[p.split("/")[0]], p))
    header = ["url", "md5", "path", "species_id", "bb_x1", "bb_y1", "bb_x2", "bb_y2"]
    header += [f"{part}_{c}" for part in _BIRDSNAP_PARTS for c in ("x", "y")]
    lines = ["\t".join(header)]
    for i, p in enumerate(rows):
        url = f"http://farm{1 + i % 9}.staticflickr.com/{1000 + i}/{7000000000 + i}_{i:010x}.jpg"
        digest = md5.get(p, hashlib.md5(p.encode()).hexdigest())
        vals = [url, digest, p, str(sid_of_folder[p.split("/")[0]]), "1", "2", "14", "15"]
        vals += [str(3 + (j % 10)) for j in range(2 * len(_BIRDSNAP_PARTS))]
        lines.append("\t".join(vals))
    _write(top / "images.txt", "\n".join(lines) + "\n")
    _write(top / "all-ims", "\n".join(sorted(rows)) + "\n")
    url_of = {ln.split("\t")[2]: ln.split("\t")[0] for ln in lines[1:]}
    ok = [p for p in rows if p in present]
    _write(top / "download" / "success.txt", "".join(f"{url_of[p]}\t{p}\n" for p in ok))
    _write(top / "download" / "fail.txt", "".join(f"{url_of[p]}\t{p}\n" for p in rows if p not in present))
    _write(top / "download" / "log.txt", "[2015-04-01 00:00:00] Starting.\n[2015-04-01 00:00:01] Finished.\n")
    truth = {f"download/images/{p}": sid_of_folder[p.split("/")[0]] - 1 for p in present_test}
    return Replica(
        source=top, truth=truth, class_names=[s["common"] for s in species],
        test_images=len(truth), train_images=len(_BIRDSNAP_TRAIN),
        layout="birdsnap/ as birdsnap.tgz unpacks + get_birdsnap.py's download/images/<Folder>/<n>.jpg; "
               "species.txt id order (family, scientific name), test_images.txt selects the test split",
        class_ids=[folder_of[s["dir"]] for s in species],
        notes="species.txt's dir column is lower case (coopers_hawk); the image folders are images.txt's "
              "path folders (Coopers_Hawk). test_images.txt lists all 2443 test paths, one per species is "
              "present (downloads fail in reality too); a .png test image (Chipping_Sparrow) is real.",
    )


def build_birdsnap_download(root: Path) -> Replica:
    top = Path(root) / "birdsnap"
    top.mkdir(parents=True)
    return _birdsnap_tree(top)


def build_birdsnap_download_zip(root: Path) -> Replica:
    work = Path(root) / "_birdsnap_build"
    top = work / "birdsnap"
    top.mkdir(parents=True)
    rep = _birdsnap_tree(top)
    dest = Path(root) / "birdsnap.zip"
    _zip_dir(top, dest)
    shutil.rmtree(work)
    rep.source = dest
    rep.layout = "birdsnap.zip holding birdsnap/ (the unpacked archive + download/images/ after get_birdsnap.py)"
    return rep


# ------------------------------------------------------------------------------------------- Stanford Cars

def _cars_assignment(n_classes: int, tag: str) -> list[int]:
    """Class (0-based) of image 00001.jpg, 00002.jpg, ...: one image per class, in a shuffled order."""
    order = list(range(n_classes))
    _rng(tag).shuffle(order)
    return order


def build_stanford_cars_class_folders(root: Path) -> Replica:
    """Kaggle 'stanford-car-dataset-by-classes-folder' (jutrera): car_data/car_data/{train,test}/<name>/<fname>,
    names.csv (cars_meta order, no header), anno_{train,test}.csv (no header: fname,x1,y1,x2,y2,class 1-based).
    A '/' in a class name is written '-' in its folder name (Ram C-V Cargo Van Minivan 2012)."""
    top = Path(root) / "stanford-car-dataset-by-classes-folder"
    names = stanford_cars_classes()
    _write(top / "names.csv", "".join(n + "\n" for n in names))
    truth = {}
    n_train = 0
    for split in ("train", "test"):
        assign = _cars_assignment(len(names), f"cars-kaggle-{split}")
        anno = []
        for k, cls in enumerate(assign, start=1):
            fname = f"{k:05d}.jpg"
            rel = f"car_data/car_data/{split}/{names[cls].replace('/', '-')}/{fname}"
            _img(top, rel, "cars-kaggle")
            anno.append(f"{fname},{1 + k % 7},{2 + k % 5},{12 + k % 3},{13 + k % 2},{cls + 1}")
            if split == "test":
                truth[rel] = cls
            else:
                n_train += 1
        _write(top / f"anno_{split}.csv", "\n".join(anno) + "\n")
    return Replica(
        source=top, truth=truth, class_names=names, test_images=len(truth), train_images=n_train,
        layout="Kaggle stanford-car-dataset-by-classes-folder: car_data/car_data/{train,test}/<class name>/<fname> "
               "+ names.csv + anno_{train,test}.csv; official order = names.csv (cars_meta) order, not sorted",
        notes="train and test reuse file names (00001.jpg in both), as in the real copy.",
    )


def _cars_annotations(assign: list[int], with_class: bool) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    arr = np.zeros((1, len(assign)), dtype=[(f, "O") for f in fields])
    for i, cls in enumerate(assign):
        k = i + 1
        # bbox_x2 beyond 255 for some rows: the real files mix uint8 and uint16 per value
        vals = {"bbox_x1": 1 + k % 9, "bbox_y1": 2 + k % 7, "bbox_x2": 250 + k % 20, "bbox_y2": 14 + k % 3}
        for f, v in vals.items():
            arr[0, i][f] = _uint(v)
        if with_class:
            arr[0, i]["class"] = _uint(cls + 1)
        arr[0, i]["fname"] = np.array([f"{k:05d}.jpg"])
    return arr


def build_stanford_cars_devkit(root: Path) -> Replica:
    """Official devkit layout, as torchvision.datasets.StanfordCars reads it (root/stanford_cars/):
    cars_train/, cars_test/ (flat NNNNN.jpg), devkit/{cars_meta.mat, cars_train_annos.mat, cars_test_annos.mat},
    cars_test_annos_withlabels.mat (test labels, published separately)."""
    top = Path(root) / "stanford_cars"
    names = stanford_cars_classes()
    _savemat(top / "devkit" / "cars_meta.mat", {"class_names": _cell_row(names)})
    truth, n_train = {}, 0
    for split in ("train", "test"):
        assign = _cars_assignment(len(names), f"cars-devkit-{split}")
        for k, cls in enumerate(assign, start=1):
            rel = f"cars_{split}/{k:05d}.jpg"
            _img(top, rel, "cars-devkit")
            if split == "test":
                truth[rel] = cls
            else:
                n_train += 1
        if split == "train":
            _savemat(top / "devkit" / "cars_train_annos.mat", {"annotations": _cars_annotations(assign, True)})
        else:
            _savemat(top / "devkit" / "cars_test_annos.mat", {"annotations": _cars_annotations(assign, False)})
            _savemat(top / "cars_test_annos_withlabels.mat", {"annotations": _cars_annotations(assign, True)})
    return Replica(
        source=top, truth=truth, class_names=names, test_images=len(truth), train_images=n_train,
        layout="Stanford Cars devkit: cars_test/NNNNN.jpg + cars_test_annos_withlabels.mat (annotations struct, "
               "class 1-based) + devkit/cars_meta.mat (class_names); cars_train/ + devkit/cars_train_annos.mat",
    )


# ----------------------------------------------------------------------------------------------- Flowers102

def _flowers_ids(tag: str) -> tuple[dict[int, int], list[int], list[int], list[int]]:
    """Image id (1..N) -> label (1..102); trnid, valid, tstid (unsorted, as in setid.mat).
    One test image per class, 5 train and 5 val images; ids numbered over a shuffled class order."""
    rng = _rng(tag)
    classes = list(range(1, 103))
    rng.shuffle(classes)
    extra = rng.sample(range(1, 103), 10)
    label, roles = {}, []
    for c in classes:
        roles.append((c, "tst"))
        if c in extra:
            roles.append((c, "trn" if extra.index(c) < 5 else "val"))
    for i, (c, _) in enumerate(roles, start=1):
        label[i] = c
    ids = {r: [i for i, (_, rr) in enumerate(roles, start=1) if rr == r] for r in ("trn", "val", "tst")}
    for r in ids.values():
        rng.shuffle(r)
    return label, ids["trn"], ids["val"], ids["tst"]


def _flowers_mats(folder: Path, label: dict[int, int], trn: list[int], val: list[int], tst: list[int]) -> None:
    n = len(label)
    _savemat(folder / "imagelabels.mat", {"labels": np.array([[label[i] for i in range(1, n + 1)]], dtype=np.uint8)})
    _savemat(folder / "setid.mat", {k: np.array([v], dtype=np.uint16)
                                    for k, v in (("trnid", trn), ("valid", val), ("tstid", tst))})


def _flowers_official(top: Path, tag: str) -> tuple[Replica, list[str]]:
    label, trn, val, tst = _flowers_ids(tag)
    rels = []
    for i in sorted(label):
        rel = f"jpg/image_{i:05d}.jpg"
        _img(top, rel, tag)
        rels.append(rel)
    _flowers_mats(top, label, trn, val, tst)
    truth = {f"jpg/image_{i:05d}.jpg": label[i] - 1 for i in tst}
    rep = Replica(
        source=top, truth=truth, class_names=flowers102_classes(), test_images=len(truth),
        train_images=len(trn) + len(val), layout="",
        notes="The official files carry no class names; class_names are cat_to_name.json's (Udacity copy), "
              "the names torchvision's Flowers102.classes also uses (but 'lotus lotus' at 78).",
    )
    return rep, rels


def build_flowers102_official(root: Path) -> Replica:
    """102flowers.tgz unpacked (jpg/image_NNNNN.jpg) beside imagelabels.mat and setid.mat, in the folder
    torchvision.datasets.Flowers102 reads (root/flowers-102/)."""
    top = Path(root) / "flowers-102"
    rep, _ = _flowers_official(top, "flowers-official")
    rep.layout = "flowers-102/jpg/image_NNNNN.jpg + imagelabels.mat (labels 1x8189 uint8, 1-based) + setid.mat " \
                 "(trnid/valid/tstid 1xK uint16): the test split is tstid, labels from imagelabels"
    return rep


def build_flowers102_official_tgz(root: Path) -> Replica:
    """The three official downloads side by side: 102flowers.tgz (members jpg/image_NNNNN.jpg),
    imagelabels.mat, setid.mat."""
    top = Path(root) / "flowers102"
    top.mkdir(parents=True)
    work = Path(root) / "_flowers_build"
    rep, rels = _flowers_official(work, "flowers-tgz")
    _tar_gz(work, ["jpg"], top / "102flowers.tgz")
    for f in ("imagelabels.mat", "setid.mat"):
        shutil.move(work / f, top / f)
    shutil.rmtree(work)
    rep.source = top
    rep.layout = "102flowers.tgz (jpg/image_NNNNN.jpg) + imagelabels.mat + setid.mat side by side, as downloaded"
    return rep


def build_flowers102_flower_data(root: Path) -> Replica:
    """The common 'flower_data' copy (Udacity): train/<1..102>/ and valid/<1..102>/ (folder = 1-based label,
    files keep their image_NNNNN.jpg names) and cat_to_name.json ({"21": "fire lily", ...}, unordered keys).
    It has no test split of its own: valid/ is its held-out split and is what `truth` holds."""
    top = Path(root) / "flower_data"
    rng = _rng("flower-data")
    ids = rng.sample(range(1, 8190), 2 * 102)
    truth, n_train = {}, 0
    for c in range(1, 103):
        for split, img_id in (("train", ids[2 * c - 2]), ("valid", ids[2 * c - 1])):
            rel = f"{split}/{c}/image_{img_id:05d}.jpg"
            _img(top, rel, "flower-data")
            if split == "valid":
                truth[rel] = c - 1
            else:
                n_train += 1
    shutil.copyfile(DATA / "flowers102_cat_to_name.json", top / "cat_to_name.json")
    return Replica(
        source=top, truth=truth, class_names=flowers102_classes(), test_images=len(truth), train_images=n_train,
        layout="flower_data/{train,valid}/<1..102>/image_NNNNN.jpg + cat_to_name.json; folder n = label n "
               "(string sorting puts 10 before 2); valid/ is evaluated, there is no test/",
        class_ids=[str(c) for c in range(1, 103)],
    )


# ---------------------------------------------------------------------------------------------------- GTSRB

_GTSRB_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _gtsrb_final_test(top: Path) -> dict[str, int]:
    """GTSRB_Final_Test_Images.zip -> GTSRB/Final_Test/Images/NNNNN.ppm + GT-final_test.test.csv (no ClassId);
    GTSRB_Final_Test_GT.zip -> GT-final_test.csv (';' separated, header, ClassId 0..42) at its root."""
    order = list(range(43))
    _rng("gtsrb-test").shuffle(order)
    rows, rows_noclass, truth = [], [], {}
    for k, cls in enumerate(order):
        fname = f"{k:05d}.ppm"
        _img(top, f"GTSRB/Final_Test/Images/{fname}", "gtsrb-test")
        roi = f"{1 + k % 3};{1 + k % 2};{13 + k % 2};{14 + k % 2}"
        rows.append(f"{fname};16;16;{roi};{cls}")
        rows_noclass.append(f"{fname};16;16;{roi}")
        truth[f"GTSRB/Final_Test/Images/{fname}"] = cls
    crlf = "\r\n"
    _write(top / "GT-final_test.csv", crlf.join([_GTSRB_HEADER] + rows) + crlf, newline="")
    header_noclass = _GTSRB_HEADER.rsplit(";", 1)[0]
    _write(top / "GTSRB/Final_Test/Images/GT-final_test.test.csv", crlf.join([header_noclass] + rows_noclass) + crlf,
           newline="")
    return truth


def _gtsrb_final_training(top: Path, per_class: int = 2) -> int:
    """GTSRB_Final_Training_Images.zip -> GTSRB/Final_Training/Images/<00000..00042>/<track>_<frame>.ppm
    + GT-<class>.csv in each class folder (same header and separator as the test CSV)."""
    n = 0
    for cls in range(43):
        folder = f"GTSRB/Final_Training/Images/{cls:05d}"
        rows = []
        for frame in range(per_class):
            fname = f"{cls % 5:05d}_{frame:05d}.ppm"
            _img(top, f"{folder}/{fname}", "gtsrb-train")
            rows.append(f"{fname};16;16;1;1;14;14;{cls}")
            n += 1
        _write(top / folder / f"GT-{cls:05d}.csv", "\r\n".join([_GTSRB_HEADER] + rows) + "\r\n", newline="")
    return n


def build_gtsrb_final_test(root: Path) -> Replica:
    """The official test set as its two zips unpack, in the folder torchvision.datasets.GTSRB reads (root/gtsrb/)."""
    top = Path(root) / "gtsrb"
    truth = _gtsrb_final_test(top)
    return Replica(source=top, truth=truth, class_names=gtsrb_classes(), test_images=len(truth), train_images=0,
                   layout="GTSRB/Final_Test/Images/NNNNN.ppm (flat) + GT-final_test.csv (Filename;...;ClassId, "
                          "';' separated) at the top: labels come from the CSV, not from folders",
                   class_ids=[f"{i:05d}" for i in range(43)])


def build_gtsrb_final_training(root: Path) -> Replica:
    """Only GTSRB_Final_Training_Images.zip unpacked: class folders 00000..00042, all TRAINING images.
    It holds no test image: evaluating it as a test set is wrong (truth is empty)."""
    top = Path(root) / "gtsrb_training"
    n = _gtsrb_final_training(top)
    return Replica(source=top, truth={}, class_names=gtsrb_classes(), test_images=0, train_images=n,
                   layout="GTSRB/Final_Training/Images/<00000..00042>/<track>_<frame>.ppm + GT-<class>.csv: "
                          "the training set only (no test images)",
                   class_ids=[f"{i:05d}" for i in range(43)])


def build_gtsrb_full(root: Path) -> Replica:
    """All three official zips unpacked into one folder: Final_Training (class folders) and Final_Test + GT CSV."""
    top = Path(root) / "gtsrb"
    truth = _gtsrb_final_test(top)
    n = _gtsrb_final_training(top)
    return Replica(source=top, truth=truth, class_names=gtsrb_classes(), test_images=len(truth), train_images=n,
                   layout="GTSRB/Final_Training/Images/<class>/ (train, 43 folders) and GTSRB/Final_Test/Images/ "
                          "(flat) + GT-final_test.csv: only Final_Test is the test split",
                   class_ids=[f"{i:05d}" for i in range(43)])


# --------------------------------------------------------------------------------------------------- UCF101

def _ucf_video_action(action: str) -> str:
    """The action as written in the video file names: class HandstandPushups has files v_HandStandPushups_*."""
    return "HandStandPushups" if action == "HandstandPushups" else action


def _coop_classname(action: str) -> str:
    """CoOp's folder/class name: the CamelCase words joined by '_' (re.findall('[A-Z][^A-Z]*'))."""
    return "_".join(re.findall("[A-Z][^A-Z]*", action))


def build_ucf101_coop_midframes(root: Path) -> Replica:
    """CoOp's UCF101: ucf101/UCF-101-midframes/<Apply_Eye_Makeup>/v_ApplyEyeMakeup_g01_c01.jpg and
    split_zhou_UCF101.json {"train","val","test": [[impath (relative to UCF-101-midframes), label 0-based
    from classInd, classname], ...]}, written as Dassl's write_json does (indent=4, separators=(",", ": ")).
    The frames folder holds every video's frame; only the JSON's "test" entries (split 1's test list) count."""
    top = Path(root) / "ucf101"
    actions = ucf101_classind()
    rng = _rng("ucf-coop")
    val_classes = set(rng.sample(range(101), 20))
    split = {"train": [], "val": [], "test": []}
    truth = {}
    for label, action in enumerate(actions):
        cname = _coop_classname(action)
        vid = _ucf_video_action(action)
        entries = [("test", 1), ("train", 8)] + ([("val", 9)] if label in val_classes else [])
        for part, group in entries:
            impath = f"{cname}/v_{vid}_g{group:02d}_c01.jpg"
            _img(top / "UCF-101-midframes", impath, "ucf-coop")
            split[part].append([impath, label, cname])
            if part == "test":
                truth[f"UCF-101-midframes/{impath}"] = label
    with open(top / "split_zhou_UCF101.json", "w") as f:
        json.dump({"train": split["train"], "val": split["val"], "test": split["test"]}, f, indent=4,
                  separators=(",", ": "))
    return Replica(
        source=top, truth=truth, class_names=actions, test_images=len(truth),
        train_images=len(split["train"]) + len(split["val"]),
        layout="ucf101/UCF-101-midframes/<Camel_Case_Words>/v_<Action>_gGG_cCC.jpg + split_zhou_UCF101.json: "
               "only the JSON's test entries (testlist01) are the test split; labels from the JSON",
        class_ids=[_coop_classname(a) for a in actions],
        notes="class folder Handstand_Pushups holds v_HandStandPushups_* files (UCF101's own spelling clash).",
    )


def build_ucf101_official_lists(root: Path) -> Replica:
    """UCF101's official ucfTrainTestlist/ (classInd.txt '1 ApplyEyeMakeup'; testlistNN.txt 'Action/v_..avi';
    trainlistNN.txt 'Action/v_..avi <1-based label>'; splits 1-3 test groups 1-7, 8-14, 15-21) beside a folder
    of middle frames mirroring the video tree (UCF-101/<Action>/v_<Action>_gGG_cCC.jpg, .avi -> .jpg).
    Split 1 is the evaluated split."""
    top = Path(root) / "UCF101"
    actions = ucf101_classind()
    crlf = "\r\n"  # the split files have Windows line ends (a public copy of classInd.txt; see the notes)
    _write(top / "ucfTrainTestlist" / "classInd.txt", "".join(f"{i} {a}{crlf}" for i, a in enumerate(actions, start=1)),
           newline="")
    groups = [1, 8, 15, 22]  # one video in each split's test groups (g01-07, g08-14, g15-21) and one train-only
    videos = {(a, g): f"{a}/v_{_ucf_video_action(a)}_g{g:02d}_c01" for a in actions for g in groups}
    for v in videos.values():
        _img(top / "UCF-101", v + ".jpg", "ucf-official")
    for s, test_groups in ((1, range(1, 8)), (2, range(8, 15)), (3, range(15, 22))):
        test = [v for (a, g), v in videos.items() if g in test_groups]
        train = [(v, actions.index(a) + 1) for (a, g), v in videos.items() if g not in test_groups]
        _write(top / "ucfTrainTestlist" / f"testlist{s:02d}.txt", "".join(f"{v}.avi{crlf}" for v in test), newline="")
        _write(top / "ucfTrainTestlist" / f"trainlist{s:02d}.txt", "".join(f"{v}.avi {lab}{crlf}" for v, lab in train),
               newline="")
    truth = {f"UCF-101/{v}.jpg": actions.index(a) for (a, g), v in videos.items() if g in range(1, 8)}
    return Replica(
        source=top, truth=truth, class_names=actions, test_images=len(truth), train_images=len(videos) - len(truth),
        layout="UCF101/ucfTrainTestlist/{classInd,testlist0N,trainlist0N}.txt + UCF-101/<Action>/v_*.jpg middle "
               "frames: testlist01 (with .avi names) selects the test split, classInd gives the labels",
        class_ids=actions,
        notes="folder HandstandPushups holds v_HandStandPushups_* (the lists write it so too).",
    )


# -------------------------------------------------------------------------------------------------- ImageNet

def _imagenet_val_assignment(tag: str) -> list[int]:
    """Standard class index (0..999) of ILSVRC2012_val_00000001.JPEG, ...: one image per class, shuffled."""
    order = list(range(1000))
    _rng(tag).shuffle(order)
    return order


def _imagenet_meta_mat(path: Path) -> None:
    """ILSVRC2012 devkit data/meta.mat: `synsets`, an Nx1 struct array with fields ILSVRC2012_ID, WNID, words,
    gloss, num_children, children, wordnet_height, num_train_images, sorted by ILSVRC2012_ID; IDs 1..1000 are
    the low-level (leaf) synsets, num_children 0; high-level synsets have IDs > 1000 (root 1001 'entity').
    The real file has 860 high-level synsets; this one has three."""
    syn = dict(imagenet_synsets())
    ids = imagenet_devkit_ids()
    by_id = sorted((i, w) for w, i in ids.items())
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    high = [(1001, "n00001740", "entity", [1002, 1003]),
            (1002, "n00001930", "physical entity", list(range(1, 501))),
            (1003, "n00002137", "abstraction, abstract entity", list(range(501, 1001)))]
    arr = np.zeros((len(by_id) + len(high), 1), dtype=[(f, "O") for f in fields])
    for row, (i, w) in enumerate(by_id):
        arr[row, 0] = (_uint(i), np.array([w]), np.array([syn[w]]), np.array([f"(WordNet gloss of {w})"]),
                       _uint(0), np.zeros((0, 0)), _uint(0), _uint(1300))
    for k, (i, w, words, children) in enumerate(high):
        arr[len(by_id) + k, 0] = (_uint(i), np.array([w]), np.array([words]), np.array([f"(WordNet gloss of {w})"]),
                                  _uint(len(children)), np.array([children], dtype=np.uint16), _uint(18 - k), _uint(0))
    _savemat(path, {"synsets": arr})


def _imagenet_val_and_devkit(top: Path, tag: str) -> tuple[dict[str, int], Path]:
    """ILSVRC2012_img_val/ (the val tar unpacks flat) + a devkit folder ILSVRC2012_devkit_t12/data/{meta.mat,
    ILSVRC2012_validation_ground_truth.txt} (one ILSVRC2012_ID per line, in file-name order)."""
    wnids = [w for w, _ in imagenet_synsets()]
    ids = imagenet_devkit_ids()
    assign = _imagenet_val_assignment(tag)
    truth, gt = {}, []
    for k, cls in enumerate(assign, start=1):
        rel = f"ILSVRC2012_img_val/ILSVRC2012_val_{k:08d}.JPEG"
        _img(top, rel, tag)
        truth[rel] = cls
        gt.append(str(ids[wnids[cls]]))
    dk = top / "ILSVRC2012_devkit_t12"
    _write(dk / "data" / "ILSVRC2012_validation_ground_truth.txt", "\n".join(gt) + "\n")
    _imagenet_meta_mat(dk / "data" / "meta.mat")
    _write(dk / "readme.txt", "ILSVRC2012 Development Kit (replica: data/ only; see tests/set_replicas.py)\n")
    return truth, dk


def _imagenet_names() -> tuple[list[str], list[str]]:
    syn = imagenet_synsets()
    return [words for _, words in syn], [w for w, _ in syn]


def build_imagenet_val_devkit_targz(root: Path) -> Replica:
    """As downloaded: ILSVRC2012_img_val.tar unpacked (flat ILSVRC2012_val_NNNNNNNN.JPEG) beside the devkit
    archive ILSVRC2012_devkit_t12.tar.gz (members ILSVRC2012_devkit_t12/data/...)."""
    top = Path(root) / "imagenet"
    truth, dk = _imagenet_val_and_devkit(top, "imagenet-devkit-targz")
    _tar_gz(top, [dk.name], top / "ILSVRC2012_devkit_t12.tar.gz")
    shutil.rmtree(dk)
    names, wnids = _imagenet_names()
    return Replica(source=top, truth=truth, class_names=names, test_images=len(truth), train_images=0,
                   layout="ILSVRC2012_img_val/ (flat) + ILSVRC2012_devkit_t12.tar.gz: labels = ground-truth file's "
                          "ILSVRC2012_IDs mapped through meta.mat's synsets to wnids (IDs are not sorted-wnid order)",
                   class_ids=wnids)


def build_imagenet_val_devkit_folder(root: Path) -> Replica:
    """As above with the devkit unpacked: ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}."""
    top = Path(root) / "imagenet"
    truth, _ = _imagenet_val_and_devkit(top, "imagenet-devkit-folder")
    names, wnids = _imagenet_names()
    return Replica(source=top, truth=truth, class_names=names, test_images=len(truth), train_images=0,
                   layout="ILSVRC2012_img_val/ (flat) + ILSVRC2012_devkit_t12/data/ (meta.mat, ground truth) unpacked",
                   class_ids=wnids)


def build_imagenet_kaggle(root: Path) -> Replica:
    """Kaggle 'imagenet-object-localization-challenge': LOC_synset_mapping.txt ('n01440764 tench, Tinca tinca',
    sorted, 1000 lines), LOC_val_solution.csv (header ImageId,PredictionString; rows unordered; prediction string
    'wnid x_min y_min x_max y_max' per box, space separated), LOC_train_solution.csv, LOC_sample_submission.csv,
    ILSVRC/Data/CLS-LOC/{train/<wnid>/<wnid>_<n>.JPEG, val/ILSVRC2012_val_NNNNNNNN.JPEG (flat),
    test/ILSVRC2012_test_NNNNNNNN.JPEG (unlabelled)}."""
    top = Path(root) / "imagenet-object-localization-challenge"
    names, wnids = _imagenet_names()
    top.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DATA / "imagenet_LOC_synset_mapping.txt", top / "LOC_synset_mapping.txt")
    assign = _imagenet_val_assignment("imagenet-kaggle")
    rows, truth = [], {}
    for k, cls in enumerate(assign, start=1):
        image_id = f"ILSVRC2012_val_{k:08d}"
        rel = f"ILSVRC/Data/CLS-LOC/val/{image_id}.JPEG"
        _img(top, rel, "imagenet-kaggle")
        truth[rel] = cls
        boxes = [f"{wnids[cls]} {1 + k % 5} {2 + k % 4} {12 + k % 3} {13 + k % 2}"]
        if k % 7 == 0:  # some images carry two boxes of the same class
            boxes.append(f"{wnids[cls]} 0 0 8 8")
        rows.append(f"{image_id},{' '.join(boxes)}")
    _rng("imagenet-kaggle-rows").shuffle(rows)
    _write(top / "LOC_val_solution.csv", "ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    train = [(wnids[c], n) for c, n in ((0, 10026), (0, 10027), (65, 1048), (999, 103), (500, 2178))]
    for w, n in train:
        _img(top, f"ILSVRC/Data/CLS-LOC/train/{w}/{w}_{n}.JPEG", "imagenet-kaggle")
    _write(top / "LOC_train_solution.csv", "ImageId,PredictionString\n"
           + "".join(f"{w}_{n},{w} 1 1 14 14\n" for w, n in train))
    tests = [f"ILSVRC2012_test_{k:08d}" for k in range(1, 4)]
    for t in tests:
        _img(top, f"ILSVRC/Data/CLS-LOC/test/{t}.JPEG", "imagenet-kaggle")
    _write(top / "LOC_sample_submission.csv", "ImageId,PredictionString\n"
           + "".join(f"{t},{wnids[0]} 0 0 100 100\n" for t in tests))
    return Replica(source=top, truth=truth, class_names=names, test_images=len(truth),
                   train_images=len(train) + len(tests),
                   layout="Kaggle ILSVRC/Data/CLS-LOC/val/ (flat) + LOC_val_solution.csv + LOC_synset_mapping.txt; "
                          "train/<wnid>/ and the unlabelled test/ are not evaluated",
                   class_ids=wnids)


def build_imagenet_val_wnid_folders(root: Path) -> Replica:
    """val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG (what torchvision's ImageNet / valprep.sh make): works already."""
    top = Path(root) / "imagenet" / "val"
    names, wnids = _imagenet_names()
    assign = _imagenet_val_assignment("imagenet-wnid")
    truth = {}
    for k, cls in enumerate(assign, start=1):
        rel = f"{wnids[cls]}/ILSVRC2012_val_{k:08d}.JPEG"
        _img(top, rel, "imagenet-wnid")
        truth[rel] = cls
    return Replica(source=top, truth=truth, class_names=names, test_images=len(truth), train_images=0,
                   layout="val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG: class = sorted position of the wnid",
                   class_ids=wnids)


def build_imagenetv2_matched_frequency(root: Path) -> Replica:
    """imagenetv2-matched-frequency-format-val/<0..999>/<sha1>.jpeg: folder k is class k (string sorting of the
    folder names gives 0, 1, 10, 100, ...). One image per class here (10 in the real set)."""
    top = Path(root) / "imagenetv2-matched-frequency-format-val"
    names, wnids = _imagenet_names()
    truth = {}
    for cls in range(1000):
        rel = f"{cls}/{hashlib.sha1(f'v2-{cls}'.encode()).hexdigest()}.jpeg"
        _img(top, rel, "imagenetv2")
        truth[rel] = cls
    return Replica(source=top, truth=truth, class_names=names, test_images=len(truth), train_images=0,
                   layout="imagenetv2-matched-frequency-format-val/<0..999>/<hash>.jpeg: folder number = class index",
                   class_ids=wnids)


# ------------------------------------------------------------------------------------------------ Country211

def build_country211(root: Path) -> Replica:
    """OpenAI's country211.tgz unpacked: country211/{train,valid,test}/<ISO 3166-1 alpha-2>/<n>.jpg.
    The label order is the sorted code order (CLIP's class list; torchvision's ImageFolder)."""
    top = Path(root) / "country211"
    codes = country211_codes()
    truth, n_other = {}, 0
    rng = _rng("country211")
    for split in ("train", "valid", "test"):
        chosen = range(len(codes)) if split == "test" else rng.sample(range(len(codes)), 5)
        for cls in chosen:
            rel = f"{split}/{codes[cls]}/{rng.randrange(10**9, 10**10)}.jpg"
            _img(top, rel, "country211")
            if split == "test":
                truth[rel] = cls
            else:
                n_other += 1
    return Replica(source=top, truth=truth, class_names=codes, test_images=len(truth), train_images=n_other,
                   layout="country211/{train,valid,test}/<ISO code>/<n>.jpg: test/ is the split, codes sorted",
                   class_ids=codes)


# ---------------------------------------------------------------------------------------------------- index

BUILDERS = {
    "birdsnap_download": build_birdsnap_download,
    "birdsnap_download_zip": build_birdsnap_download_zip,
    "stanford_cars_class_folders": build_stanford_cars_class_folders,
    "stanford_cars_devkit": build_stanford_cars_devkit,
    "flowers102_official": build_flowers102_official,
    "flowers102_official_tgz": build_flowers102_official_tgz,
    "flowers102_flower_data": build_flowers102_flower_data,
    "gtsrb_final_test": build_gtsrb_final_test,
    "gtsrb_final_training": build_gtsrb_final_training,
    "gtsrb_full": build_gtsrb_full,
    "ucf101_coop_midframes": build_ucf101_coop_midframes,
    "ucf101_official_lists": build_ucf101_official_lists,
    "imagenet_val_devkit_targz": build_imagenet_val_devkit_targz,
    "imagenet_val_devkit_folder": build_imagenet_val_devkit_folder,
    "imagenet_kaggle": build_imagenet_kaggle,
    "imagenet_val_wnid_folders": build_imagenet_val_wnid_folders,
    "imagenetv2_matched_frequency": build_imagenetv2_matched_frequency,
    "country211": build_country211,
}


def build_all(root: Path) -> dict[str, Replica]:
    """Every replica, each in its own folder root/<name>/."""
    return {name: fn(Path(root) / name) for name, fn in BUILDERS.items()}


def image_files(top: Path) -> list[str]:
    """Every image file under a folder, '/'-separated relative paths (for checks)."""
    exts = {".jpg", ".jpeg", ".png", ".gif", ".ppm"}
    return sorted(p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def read_csv_rows(path: Path, delimiter: str = ",") -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))
