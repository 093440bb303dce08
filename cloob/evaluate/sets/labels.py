"""Sets whose labels are in files of the dataset's own distribution, read with the library made for
the format (scipy for .mat, csv for .csv) and paired through the dataset's published mapping:

    gtsrb_csv        GTSRB's official test set: Final_Test/Images/*.ppm + GT-final_test.csv (ClassId)
    flowers_mat      Flowers102: jpg/image_NNNNN.jpg + imagelabels.mat (1-based labels) + setid.mat (tstid)
    cars_mat         Stanford Cars' devkit: cars_test/*.jpg + cars_test_annos_withlabels.mat (1-based class)
                     + devkit/cars_meta.mat (class_names, checked by name against the spec's classes)
    imagenet_devkit  ImageNet's validation tar as it unpacks (flat ILSVRC2012_val_*.JPEG) + the devkit's
                     data/ILSVRC2012_validation_ground_truth.txt and data/meta.mat (ILSVRC2012_ID -> wnid),
                     extracted or still in ILSVRC2012_devkit_t12.tar.gz
    imagenet_loc     the Kaggle copy: flat ILSVRC2012_val_*.JPEG + LOC_val_solution.csv (wnid first)

Each reader returns None when its files are not in the tree, and raises CloobError when they are
but do not verify (a class name that differs, an image that is not there, labels out of range).
"""

from __future__ import annotations

import csv
import io
import posixpath
import tarfile

from cloob.errors import CloobError
from cloob.evaluate.sets.reading import Reading, preview
from cloob.evaluate.sets.spec import DownstreamSpec, normalize
from cloob.evaluate.sets.tree import Tree

DESCRIPTIONS = {
    "class_folders": "one folder per class{split}",
    "gtsrb_csv": "the official test set: Final_Test/Images/*.ppm with GT-final_test.csv (GTSRB_Final_Test_Images.zip "
                 "+ GTSRB_Final_Test_GT.zip, unpacked into one folder)",
    "flowers_mat": "the official files in one folder: 102flowers.tgz (or its jpg/ folder), imagelabels.mat, setid.mat",
    "cars_mat": "the official devkit: cars_test/ with cars_test_annos_withlabels.mat and devkit/cars_meta.mat",
    "imagenet_devkit": "the validation images as ILSVRC2012_img_val.tar unpacks (flat ILSVRC2012_val_*.JPEG) with "
                       "ILSVRC2012_devkit_t12.tar.gz (or its data/ folder) beside them",
    "imagenet_loc": "the Kaggle copy: ILSVRC/Data/CLS-LOC/val/*.JPEG with LOC_val_solution.csv",
}


def describe(spec: DownstreamSpec, layout: str) -> str:
    split = f" (with {' or '.join(spec.split_files)} for the test split)" if spec.split_files else ""
    return DESCRIPTIONS[layout].format(split=split)


def _mat(tree: Tree, rel: str, spec: DownstreamSpec, what: str) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(io.BytesIO(tree.read_bytes(rel)), squeeze_me=True)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise CloobError(f"{spec.name}: {rel} is not a readable .mat file ({type(e).__name__}: {e})",
                         f"download {what} again") from None


def _images_by_name(tree: Tree) -> dict[str, list[str]]:
    """{file name, lower case: [paths]} of every image in the tree."""
    out: dict[str, list[str]] = {}
    for ps in tree.images.values():
        for p in ps:
            out.setdefault(posixpath.basename(p).lower(), []).append(p)
    return out


def _locate(spec: DownstreamSpec, names: list[str], tree: Tree, label_file: str) -> list[str]:
    """The tree path of each file name a label file lists: one folder holds them all."""
    index = _images_by_name(tree)
    folders: dict[str, int] = {}
    for n in names:
        for p in index.get(n.lower(), []):
            d = posixpath.dirname(p)
            folders[d] = folders.get(d, 0) + 1
    if not folders:
        raise CloobError(f"{spec.name}: found {label_file}, but none of the {len(names)} images it lists "
                         f"({preview(names, 3)}) is in the tree", "put the images beside it, as the dataset "
                         "unpacks (the label file and the image folder in one folder)")
    d = max(folders, key=lambda k: (folders[k], -k.count("/")))
    paths = [posixpath.join(d, n) if d else n for n in names]
    have = {p.lower(): p for p in tree.images.get(d or ".", [])}
    return [have.get(p.lower(), "") for p in paths]


def _reading(spec, layout, names, labels, paths, how, split_by, left_out, sources) -> Reading:
    items = [(p, c) for p, c in zip(paths, labels) if p]
    missing = sum(1 for p in paths if not p)
    classes = [{"index": i, "name": spec.classes[i], "source": sources[i], "how": how} for i in range(len(spec.classes))]
    split = {"name": spec.layout.split or "test", "by": split_by, "left_out": left_out,
             "listed": len(names), "listed_missing": missing}
    r = Reading(layout, sorted(items), classes, split)
    if missing:
        r.warnings.append(f"{missing} of the {len(names)} test images listed in {split_by} are not in the copy")
    return r


def _check_range(spec: DownstreamSpec, labels: list[int], rel: str, base: int) -> None:
    bad = sorted({c + base for c in labels if not 0 <= c < len(spec.classes)})
    if bad:
        raise CloobError(f"{spec.name}: {rel} has labels {preview([str(b) for b in bad], 5)} outside "
                         f"{base}..{len(spec.classes) - 1 + base}", f"use {spec.name}'s own {posixpath.basename(rel)}")


# ---------------------------------------------------------------------------------------------- GTSRB

def read_gtsrb_csv(spec: DownstreamSpec, tree: Tree, where: str, split: str | None) -> Reading | None:
    hits = tree.find("GT-final_test*.csv")
    if not hits:
        return None
    rows = []
    for rel in hits:
        text = tree.read_bytes(rel).decode("utf-8-sig", errors="replace")
        reader = csv.DictReader(io.StringIO(text), delimiter=";")
        if "ClassId" in (reader.fieldnames or []):
            rows = list(reader)
            break
    else:
        raise CloobError(f"{spec.name}: {hits[0]} has no ClassId column: it is the unlabelled test list",
                         "add GT-final_test.csv from GTSRB_Final_Test_GT.zip to the folder (the labelled one)")
    try:
        names = [r["Filename"] for r in rows]
        labels = [int(r["ClassId"]) for r in rows]
    except (KeyError, ValueError, TypeError) as e:
        raise CloobError(f"{spec.name}: {rel} is not GTSRB's ground truth (Filename;...;ClassId): {e}",
                         "use GT-final_test.csv from GTSRB_Final_Test_GT.zip") from None
    _check_range(spec, labels, rel, 0)
    paths = _locate(spec, names, tree, rel)
    return _reading(spec, f"official test set with {posixpath.basename(rel)}", names, labels, paths,
                    f"ClassId in {posixpath.basename(rel)}", rel, 0, [str(i) for i in range(len(spec.classes))])


# ------------------------------------------------------------------------------------------ Flowers102

def read_flowers_mat(spec: DownstreamSpec, tree: Tree, where: str, split: str | None) -> Reading | None:
    lab, sid = tree.find("imagelabels.mat"), tree.find("setid.mat")
    if not lab and not sid:
        return None
    if not (lab and sid):
        have, need = ("imagelabels.mat", "setid.mat") if lab else ("setid.mat", "imagelabels.mat")
        raise CloobError(f"{spec.name}: {where} has {have} but not {need}",
                         f"put {need} (from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/) beside it")
    labels_all = [int(x) for x in _mat(tree, lab[0], spec, "imagelabels.mat")["labels"].ravel()]
    ids = _mat(tree, sid[0], spec, "setid.mat")
    want = split or "test"
    key = {"test": "tstid", "train": "trnid", "valid": "valid", "val": "valid"}.get(want)
    if key is None:
        raise CloobError(f"{spec.name}: setid.mat has no split {want!r}", "use --split test, train or valid")
    chosen = [int(x) for x in ids[key].ravel()]
    names = [f"image_{i:05d}.jpg" for i in chosen]
    labels = [labels_all[i - 1] - 1 for i in chosen]
    _check_range(spec, labels, lab[0], 1)
    if not any(posixpath.basename(p).lower().startswith("image_") for ps in tree.images.values() for p in ps):
        if tree.find("102flowers.tgz"):
            raise CloobError(f"{spec.name}: {where} holds 102flowers.tgz still packed", "prepare it with "
                             f"cloob prepare-downstream {spec.name} --source {spec.name}=<that folder>, which "
                             "unpacks it (or unpack it there: tar xzf 102flowers.tgz)")
    paths = _locate(spec, names, tree, lab[0])
    r = _reading(spec, "official files (jpg/, imagelabels.mat, setid.mat)", names, labels, paths,
                 "1-based label in imagelabels.mat", f"{sid[0]} ({key})", len(labels_all) - len(chosen),
                 [str(i + 1) for i in range(len(spec.classes))])
    r.split["name"] = "valid" if key == "valid" else want
    return r


# ---------------------------------------------------------------------------------------- Stanford Cars

def read_cars_mat(spec: DownstreamSpec, tree: Tree, where: str, split: str | None) -> Reading | None:
    annos = tree.find("cars_test_annos_withlabels*.mat")
    meta = tree.find("cars_meta.mat")
    if not annos:
        if tree.find("cars_test_annos.mat") and meta:
            raise CloobError(f"{spec.name}: {where} has the devkit's cars_test_annos.mat, which has no labels",
                             "add cars_test_annos_withlabels.mat (published with the test labels) beside it")
        return None
    if not meta:
        raise CloobError(f"{spec.name}: {where} has {annos[0]} but not devkit/cars_meta.mat (the class names)",
                         "unpack car_devkit.tgz beside it")
    names_meta = [str(n) for n in _mat(tree, meta[0], spec, "car_devkit.tgz")["class_names"].ravel()]
    if len(names_meta) != len(spec.classes):
        raise CloobError(f"{spec.name}: {meta[0]} has {len(names_meta)} class names, the spec {len(spec.classes)}",
                         "use Stanford Cars' own devkit")
    # The file's class k is the spec's class k only if their names agree: verify every one.
    keys = spec.class_by_name()
    order = [keys.get(normalize(n, spec.layout.normalize)) for n in names_meta]
    bad = [f"{k + 1}: {n!r}" for k, (n, i) in enumerate(zip(names_meta, order)) if i is None]
    if bad:
        raise CloobError(f"{spec.name}: {len(bad)} class names in {meta[0]} name no class of the spec: "
                         f"{preview(bad, 5)}", "use Stanford Cars' own cars_meta.mat, or add the names as aliases "
                         "in a copy of the spec")
    a = _mat(tree, annos[0], spec, "cars_test_annos_withlabels.mat")["annotations"]
    try:
        names = [str(x) for x in a["fname"].ravel()]
        raw = [int(x) for x in a["class"].ravel()]
    except (ValueError, KeyError, IndexError) as e:
        raise CloobError(f"{spec.name}: {annos[0]} has no annotations with fname and class ({e})",
                         "use cars_test_annos_withlabels.mat as published") from None
    _check_range(spec, [c - 1 for c in raw], annos[0], 1)
    labels = [order[c - 1] for c in raw]
    paths = _locate(spec, names, tree, annos[0])
    sources = [""] * len(spec.classes)
    for k, i in enumerate(order):
        sources[i] = f"{k + 1}: {names_meta[k]}"
    return _reading(spec, "official devkit (cars_test/, cars_test_annos_withlabels.mat, cars_meta.mat)", names,
                    labels, paths, "class id in the annotations, its name checked against cars_meta.mat",
                    annos[0], 0, sources)


# --------------------------------------------------------------------------------------------- ImageNet

def _devkit_files(tree: Tree) -> tuple[bytes, bytes, str] | None:
    """(ground truth text, meta.mat bytes, where) from an unpacked devkit or from its archive."""
    gt, meta = tree.find("ILSVRC2012_validation_ground_truth.txt"), tree.find("meta.mat")
    if gt and meta:
        return tree.read_bytes(gt[0]), tree.read_bytes(meta[0]), posixpath.dirname(gt[0]) or "."
    for rel in tree.find("ILSVRC2012_devkit_t12.tar*"):
        with tarfile.open(fileobj=io.BytesIO(tree.read_bytes(rel))) as tf:
            members = {posixpath.basename(m.name): m for m in tf.getmembers() if m.isfile()}
            g, m = members.get("ILSVRC2012_validation_ground_truth.txt"), members.get("meta.mat")
            if g is not None and m is not None:
                return tf.extractfile(g).read(), tf.extractfile(m).read(), rel
    return None


def _wnid_index(spec: DownstreamSpec, wnids: list[str], source: str) -> dict[str, int]:
    """Class index of each of ImageNet's 1000 wnids: its position in sorted order (the standard index)."""
    ordered = sorted(set(wnids))
    if len(ordered) != len(spec.classes):
        raise CloobError(f"{spec.name}: {source} names {len(ordered)} classes, the spec {len(spec.classes)}",
                         "use the ILSVRC2012 files (1000 classes)")
    if spec.folders is not None and [normalize(f, "exact") for f in spec.folders] != ordered:
        raise CloobError(f"{spec.name}: the wnids in {source} are not the spec's", "use the ILSVRC2012 files")
    return {w: i for i, w in enumerate(ordered)}


def read_imagenet_devkit(spec: DownstreamSpec, tree: Tree, where: str, split: str | None) -> Reading | None:
    found = _devkit_files(tree)
    if found is None:
        return None
    gt_text, meta_bytes, src = found
    import scipy.io

    try:
        syn = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        ids = [int(x) for x in syn["ILSVRC2012_ID"].ravel()]
        wnids = [str(x) for x in syn["WNID"].ravel()]
        kids = [int(x) for x in syn["num_children"].ravel()]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CloobError(f"{spec.name}: the devkit's meta.mat in {src} has no synsets with ILSVRC2012_ID, WNID, "
                         f"num_children ({type(e).__name__}: {e})", "download ILSVRC2012_devkit_t12.tar.gz again") from None
    leaf = {i: w for i, w, k in zip(ids, wnids, kids) if k == 0}
    index = _wnid_index(spec, list(leaf.values()), f"{src} (meta.mat)")
    try:
        gt = [int(x) for x in gt_text.decode().split()]
    except ValueError:
        raise CloobError(f"{spec.name}: the ground truth in {src} is not one class id per line",
                         "download ILSVRC2012_devkit_t12.tar.gz again") from None
    if any(g not in leaf for g in gt):
        raise CloobError(f"{spec.name}: the ground truth in {src} has ids that meta.mat does not know",
                         "use the devkit's own two files")
    names = [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, len(gt) + 1)]
    labels = [index[leaf[g]] for g in gt]
    paths = _locate(spec, names, tree, f"{src} (ground truth)")
    sources = [""] * len(spec.classes)
    for i, w in leaf.items():
        sources[index[w]] = f"{w} (ILSVRC2012_ID {i})"
    return _reading(spec, "flat validation images with the devkit's ground truth", names, labels, paths,
                    "devkit id -> wnid (meta.mat) -> sorted-wnid index", src, 0, sources)


def read_imagenet_loc(spec: DownstreamSpec, tree: Tree, where: str, split: str | None) -> Reading | None:
    hits = tree.find("LOC_val_solution.csv")
    if not hits:
        return None
    rel = hits[0]
    reader = csv.DictReader(io.StringIO(tree.read_bytes(rel).decode("utf-8-sig", errors="replace")))
    try:
        rows = [(r["ImageId"], r["PredictionString"].split()[0]) for r in reader]
    except (KeyError, IndexError, AttributeError) as e:
        raise CloobError(f"{spec.name}: {rel} is not ImageId,PredictionString ({type(e).__name__})",
                         "use LOC_val_solution.csv as published") from None
    mapping = tree.find("LOC_synset_mapping.txt")
    wnids = ([ln.split()[0] for ln in tree.read_bytes(mapping[0]).decode().splitlines() if ln.strip()]
             if mapping else [w for _, w in rows])
    index = _wnid_index(spec, wnids, mapping[0] if mapping else rel)
    unknown = sorted({w for _, w in rows if w not in index})
    if unknown:
        raise CloobError(f"{spec.name}: {rel} names wnids that are no ImageNet class: {preview(unknown, 5)}",
                         "use LOC_val_solution.csv as published")
    rows.sort()
    names = [f"{i}.JPEG" for i, _ in rows]
    labels = [index[w] for _, w in rows]
    paths = _locate(spec, names, tree, rel)
    sources = [""] * len(spec.classes)
    for w, i in index.items():
        sources[i] = w
    return _reading(spec, f"flat validation images with {posixpath.basename(rel)}", names, labels, paths,
                    "wnid in LOC_val_solution.csv -> sorted-wnid index", rel, 0, sources)


READERS = {"gtsrb_csv": read_gtsrb_csv, "flowers_mat": read_flowers_mat, "cars_mat": read_cars_mat,
           "imagenet_devkit": read_imagenet_devkit, "imagenet_loc": read_imagenet_loc}
