"""Sets whose images lie in one folder per class: finding the folder that holds the class folders,
pairing each folder with its class by name (or by a published class id or wnid), choosing the test
split, and applying the set's split file (Birdsnap's test_images.txt, UCF101's testlist01.txt, CoOp's
split JSON) where the source has one.

Nothing is paired by position: folders whose names do not verify are refused, and the error shows
the pairs a positional reading would have made, so the user sees why.
"""

from __future__ import annotations

import json
import posixpath
import re

from cloob.errors import CloobError
from cloob.evaluate.sets.reading import Reading, preview
from cloob.evaluate.sets.spec import DownstreamSpec, normalize
from cloob.evaluate.sets.tree import Tree

_WNID = re.compile(r"^n\d{8}$")
_PREFIX = re.compile(r"^\d{1,4}[._ -]+(?=\D)")  # "001.Black_footed_Albatross", "017_Coopers_Hawk"
# Path components that name a split, and which split (a folder may hold several).
SPLIT_WORDS = {"test": "test", "testing": "test", "tst": "test", "final_test": "test",
               "val": "val", "valid": "valid", "validation": "valid",
               "train": "train", "training": "train", "trn": "train", "final_training": "train"}


class Pairing:
    """How folder names are paired with classes: {folder: (class index, how)} and the folders that
    verify as no class."""

    def __init__(self, spec: DownstreamSpec, folders: list[str]):
        self.spec, self.folders = spec, folders
        self.matched: dict[str, tuple[int, str]] = {}
        self.unknown: list[str] = []
        self.problem = ""
        n, lay = len(spec.classes), spec.layout
        keys = spec.class_by_name() if lay.by == "name" else {}
        wnids = sorted(f for f in folders if _WNID.match(f)) if lay.by == "wnid" else []
        known = {w: i for i, w in enumerate(spec.folders)} if lay.by == "wnid" and spec.folders else None
        if wnids and known is None and len(wnids) != n:  # which are missing cannot be told from names alone
            self.problem = f"{len(wnids)} folders named by wnid where {spec.name} has {n} classes"
        for f in folders:
            if lay.by == "wnid" and known is not None:
                hit = (known[f], "wnid") if f in known else None
            elif lay.by == "wnid":
                hit = (wnids.index(f), "wnid, in sorted order") if _WNID.match(f) and len(wnids) == n else None
            elif lay.by == "index" or (f.isdigit() and lay.numbers is not None):
                base = 0 if lay.by == "index" else lay.numbers
                hit = ((int(f) - base, f"class id {f} (counted from {base})")
                       if f.isdigit() and 0 <= int(f) - base < n else None)
            else:
                k = normalize(f, lay.normalize)
                hit = (keys[k], "folder name") if k in keys else None
                if hit is None and _PREFIX.match(f):
                    k = normalize(_PREFIX.sub("", f), lay.normalize)
                    hit = (keys[k], "folder name after its number") if k in keys else None
            if hit is not None:
                self.matched[f] = hit
            elif not (self.problem and _WNID.match(f)):
                self.unknown.append(f)

    @property
    def classes_found(self) -> int:
        return len({i for i, _ in self.matched.values()})

    def duplicates(self) -> dict[int, list[str]]:
        by: dict[int, list[str]] = {}
        for f, (i, _) in self.matched.items():
            by.setdefault(i, []).append(f)
        return {i: fs for i, fs in by.items() if len(fs) > 1}


def _splits_of(path: str) -> set[str]:
    return {SPLIT_WORDS[p.lower()] for p in path.split("/") if p.lower() in SPLIT_WORDS}


def _candidates(spec: DownstreamSpec, tree: Tree) -> dict[str, Pairing]:
    out = {}
    for d, kids in tree.subdirs.items():
        kids = [k for k in kids if not k.startswith("_")]
        if kids:
            p = Pairing(spec, kids)
            if p.matched or p.problem:
                out[d] = p
    return out


def _positional_refusal(spec: DownstreamSpec, tree: Tree, where: str) -> CloobError | None:
    """When some folder holds about as many image folders as the set has classes, yet their names name
    no class: refuse, and show what pairing them by sorted order would have done."""
    n = len(spec.classes)
    for d, kids in sorted(tree.subdirs.items(), key=lambda kv: kv[0].count("/")):
        with_images = [k for k in kids if tree.images_under(tree.child(d, k))]
        if len(with_images) >= max(2, int(0.9 * n)) and len(with_images) <= n + max(2, n // 10):
            pairs = [f"{f!r} -> {c!r}" for f, c in zip(sorted(with_images), spec.classes)]
            return CloobError(
                f"{spec.name}: the {len(with_images)} folders in {where}{'' if d == '.' else '/' + d} do not "
                f"name {spec.name}'s classes ({_describe(spec)}), so they cannot be paired with them; paired "
                f"by sorted order they would give {preview(pairs, 5)}: such a pairing is not verified and "
                "is refused",
                f"rename the folders to the class names, or copy data_specs/downstream/{spec.name}.yaml, add a "
                "`folders:` list (each class's folder name, parallel to `classes`) or `aliases:`, and pass "
                "the copy's path instead of the name")
    return None


def _describe(spec: DownstreamSpec) -> str:
    lay = spec.layout
    if lay.by == "wnid":
        return "folders named by WordNet id, n########"
    if lay.by == "index":
        return f"folders named 0..{len(spec.classes) - 1}"
    s = f"folders named after the classes ({lay.normalize} comparison)"
    if lay.numbers is not None:
        s += f" or by class id {lay.numbers}..{len(spec.classes) - 1 + lay.numbers}"
    return s


def _choose_root(spec: DownstreamSpec, tree: Tree, cands: dict[str, Pairing], where: str,
                 split: str | None) -> tuple[str, str]:
    """(folder holding the class folders, the split it is)."""
    want = split or spec.layout.split or "test"
    if spec.layout.root != "auto":
        rel = posixpath.normpath(spec.layout.root.strip("/")) or "."
        if rel not in tree.subdirs:
            raise CloobError(f"{spec.name}: {where} has no folder {rel!r} (layout.root); its top level holds: "
                             f"{preview(tree.top_level())}", "check that this is the right archive/folder, or "
                             "fix layout.root in the spec (or set it to auto)")
        return rel, next(iter(_splits_of(rel)), want)
    best = max(max(p.classes_found, 1) for p in cands.values())
    top = {d: p for d, p in cands.items() if max(p.classes_found, 1) >= max(1, best - max(1, best // 20))}
    wanted = [d for d in top if want in _splits_of(d) or (want == "valid" and "val" in _splits_of(d))]
    neutral = [d for d in top if not _splits_of(d)]
    others = sorted({s for d in top for s in _splits_of(d)} - {want}, key=lambda s: (s == "train", s))
    pick = wanted or neutral
    if not pick:
        hint = (f"to evaluate on the {others[0]!r} split anyway (the result is flagged as not comparable): "
                f"--split {spec.name}={others[0]}") if others and others != ["train"] else ""
        raise CloobError(f"{spec.name}: {where} holds the {', '.join(repr(o) for o in sorted(others))} split(s) of "
                         f"{spec.name} ({preview(sorted(top))}), not its {want!r} split",
                         f"point at a copy of the {want} split ({_official(spec)})" + (f"; {hint}" if hint else ""))
    pick = sorted(pick, key=lambda d: (-cands[d].classes_found, d.count("/"), d))
    if len(pick) > 1 and cands[pick[0]].classes_found == cands[pick[1]].classes_found:
        raise CloobError(f"{spec.name}: several folders in {where} look like the class-folder root: "
                         f"{preview(pick)}", "point at one of them, or set layout.root in the spec")
    return pick[0], (want if pick[0] in wanted else "test" if want == "test" else want)


def _official(spec: DownstreamSpec) -> str:
    from cloob.evaluate.sets.labels import describe

    return "; ".join(describe(spec, n) for n in spec.layouts)


def read_class_folders(spec: DownstreamSpec, tree: Tree, where: str, split: str | None) -> Reading | None:
    cands = _candidates(spec, tree)
    if not cands:
        err = _positional_refusal(spec, tree, where)
        if err is not None:
            raise err
        return None
    root, split_name = _choose_root(spec, tree, cands, where, split)
    pairing = cands.get(root) or Pairing(spec, tree.subdirs.get(root, []))
    _check_pairing(spec, pairing, f"{where}{'' if root == '.' else '/' + root}")
    classes = [None] * len(spec.classes)
    items: list[tuple[str, int]] = []
    for folder, (i, how) in sorted(pairing.matched.items()):
        classes[i] = {"index": i, "name": spec.classes[i], "source": folder, "how": how}
        items += [(p, i) for p in tree.images_under(tree.child(root, folder))]
    items.sort()
    everything = sum(len(v) for v in tree.images.values())
    split_info = {"name": split_name, "by": f"folder {root!r}", "left_out": everything - len(items)}
    listed = _split_file(spec, tree)
    layout = f"class folders in {root!r}"
    if listed is not None:
        rel, keys, labels = listed
        kept = [(p, c) for p, c in items if _key(p) in keys]
        if not kept:
            raise CloobError(f"{spec.name}: none of the {len(items)} images in {where}/{root} is listed in {rel}",
                             f"check that {rel} belongs to these images, or remove it from the folder")
        if labels:
            _check_listed_labels(spec, kept, labels, rel)
        split_info = {"name": split_name, "by": rel, "left_out": everything - len(kept),
                      "listed": len(keys), "listed_missing": len(keys) - len(kept)}
        items = kept
        layout += f", test split from {posixpath.basename(rel)}"
    return Reading(layout, items, classes, split_info)


def _check_pairing(spec: DownstreamSpec, p: Pairing, where: str) -> None:
    n = len(spec.classes)
    dup = p.duplicates()
    if dup:
        i, fs = next(iter(dup.items()))
        raise CloobError(f"{spec.name}: folders {fs} in {where} all stand for class {spec.classes[i]!r}",
                         "remove the duplicates, or use normalize: exact")
    missing = [spec.classes[i] for i in range(n) if i not in {j for j, _ in p.matched.values()}]
    if missing or p.unknown:
        parts = [p.problem] if p.problem else []
        missing = [] if p.problem else missing
        if missing:
            parts.append(f"{len(missing)} classes without a folder: {preview(missing)}")
        if p.unknown:
            parts.append(f"{len(p.unknown)} folders that name no class: {preview(p.unknown)}")
        raise CloobError(f"{spec.name}: the class folders in {where} do not match the spec ({n} classes, "
                         f"{_describe(spec)}; found {len(p.folders)} folders): " + "; ".join(parts),
                         "check that the source is the right archive/folder (and complete); if a folder is "
                         "another name of a class, add it to that class's `aliases` in a copy of the spec")


def _key(path: str) -> tuple[str, str]:
    """An image's identity across a split file and a folder: (its folder, normalised; its file stem)."""
    parent = posixpath.basename(posixpath.dirname(path))
    stem = posixpath.splitext(posixpath.basename(path))[0]
    return normalize(parent, "alnum_casefold"), stem.lower()


def _split_file(spec: DownstreamSpec, tree: Tree) -> tuple[str, set, dict] | None:
    """(file, keys of the listed test images, {key: class name given by the file}) of the first of the
    spec's split files the tree holds."""
    for name in spec.split_files:
        hits = tree.find(name)
        if not hits:
            continue
        rel = hits[0]
        text = tree.read_bytes(rel).decode("utf-8", errors="replace")
        labels: dict = {}
        if rel.lower().endswith(".json"):
            try:
                entries = json.loads(text)["test"]
                keys = set()
                for impath, _label, cname in entries:
                    keys.add(_key(impath))
                    labels[_key(impath)] = cname
            except (ValueError, KeyError, TypeError) as e:
                raise CloobError(f"{spec.name}: split file {rel} is not a split JSON with a 'test' list of "
                                 f"[image path, label, class name] ({type(e).__name__}: {e})",
                                 "use the split file as published (CoOp's split_zhou_*.json)") from None
        else:
            keys = set()
            for line in text.splitlines():
                token = line.strip().split()[0] if line.strip() else ""
                if "/" in token:  # a header ("path") and blank lines are not images
                    keys.add(_key(token))
        if not keys:
            raise CloobError(f"{spec.name}: split file {rel} lists no images",
                             "use the split file as published, or remove it from the folder")
        return rel, keys, labels
    return None


def _check_listed_labels(spec: DownstreamSpec, kept: list[tuple[str, int]], labels: dict, rel: str) -> None:
    """A split file that names each image's class must agree with the folder pairing."""
    keys = spec.class_by_name("alnum_casefold")
    for p, c in kept:
        given = labels.get(_key(p))
        if given is None:
            continue
        j = keys.get(normalize(str(given), "alnum_casefold"))
        if j is None or j != c:
            raise CloobError(f"{spec.name}: {rel} gives {p} the class {given!r}, but its folder pairs it with "
                             f"{spec.classes[c]!r}", "the split file and the folders disagree: use the split "
                             "file that came with these images")
