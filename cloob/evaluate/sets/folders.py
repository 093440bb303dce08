"""A source tree's class folders, checked against a downstream spec: one walk of the tree (subfolders,
image counts), finding the folder that holds the class folders (layout.root: auto), matching folders
to classes by the spec's layout.by, and the per-class table a manifest records."""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from cloob.errors import CloobError
from cloob.evaluate.sets.spec import DownstreamSpec, normalize

# What torchvision's ImageFolder loads (compared case-insensitively), so counts equal what it sees.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")
_SHOWN = 10  # how many missing / unexpected folders an error lists


class Scan:
    """One walk of a local tree: visible subfolders and image counts per folder (relative paths)."""

    def __init__(self, top: Path):
        self.top = top
        self.subdirs: dict[str, list[str]] = {}
        self.images: dict[str, int] = {}  # recursive
        self.nbytes: dict[str, int] = {}  # recursive
        for dirpath, dirnames, filenames in os.walk(top):
            # Hidden folders and macOS resource forks are never classes (ImageFolder skips dot-folders
            # only through its file filter; here they are left out of the class list altogether).
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            rel = os.path.relpath(dirpath, top).replace(os.sep, "/")
            self.subdirs[rel] = list(dirnames)
            imgs = [f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
            self.images[rel] = len(imgs)
            self.nbytes[rel] = sum(os.path.getsize(os.path.join(dirpath, f)) for f in imgs)
        for rel in sorted(self.subdirs, key=lambda r: r.count("/"), reverse=True):  # children first
            if rel != ".":
                parent = posixpath.dirname(rel) or "."
                self.images[parent] += self.images[rel]
                self.nbytes[parent] += self.nbytes[rel]

    def child(self, rel: str, name: str) -> str:
        return name if rel == "." else f"{rel}/{name}"


def _class_like(spec: DownstreamSpec, folders: list[str], scan: Scan, rel: str) -> tuple[bool, int]:
    """(exactly N, how many) of rel's subfolders look like this spec's class folders (for root: auto)."""
    n = len(spec.classes)
    by = spec.layout.by
    if by == "name":
        keys = {normalize(f, spec.layout.normalize) for f in spec.expected_folders()}
        k = sum(normalize(f, spec.layout.normalize) in keys for f in folders)
    elif by == "index":
        k = sum(f.isdigit() and int(f) < n for f in folders)
    elif by == "wnid":
        k = sum(bool(_WNID.match(f)) for f in folders)
    else:
        k = sum(scan.images[scan.child(rel, f)] > 0 for f in folders)
    return k == n, k


def find_root(spec: DownstreamSpec, scan: Scan, where: str) -> str:
    """The folder (relative to the scan's top) that holds the class folders: layout.root, or for auto
    the one whose subfolders look most like the spec's classes; CloobError when none or several."""
    if spec.layout.root != "auto":
        rel = posixpath.normpath(spec.layout.root.strip("/")) or "."
        if rel not in scan.subdirs:
            raise CloobError(f"{spec.name}: {where} has no folder {rel!r} (layout.root); its top level holds: "
                             f"{_preview(scan.subdirs['.'])}",
                             "check that this is the right archive/folder, or fix layout.root in the spec "
                             "(or set it to auto)")
        return rel
    scores = {rel: _class_like(spec, subs, scan, rel) for rel, subs in scan.subdirs.items()}
    best = max(scores.values(), default=(False, 0))
    if best[1] == 0:
        raise CloobError(f"{spec.name}: found no folder of class folders in {where}; its top level holds: "
                         f"{_preview(scan.subdirs['.'])}",
                         f"{spec.name} expects {len(spec.classes)} class folders ({_describe(spec)}): check "
                         "that this is the right archive/folder")
    cands = [rel for rel, s in scores.items() if s == best]
    if len(cands) > 1 and spec.layout.split:
        cands = [rel for rel in cands if spec.layout.split in rel.split("/")] or cands
    if len(cands) > 1:
        raise CloobError(f"{spec.name}: several folders in {where} look like the class-folder root: "
                         f"{_preview(sorted(cands))}",
                         "set layout.root in the spec to the one to use")
    return cands[0]


def _preview(items: list[str]) -> str:
    items = list(items)
    head = ", ".join(items[:_SHOWN])
    return (head + f", ... ({len(items)} in all)") if len(items) > _SHOWN else (head or "(nothing)")


def _describe(spec: DownstreamSpec) -> str:
    return {"name": f"named after the classes ({spec.layout.normalize} comparison)",
            "index": f"named 0..{len(spec.classes) - 1}",
            "wnid": "named by WordNet id, n########",
            "sorted": "any names, numbered in sorted order"}[spec.layout.by]


def match_classes(spec: DownstreamSpec, folders: list[str], where: str) -> list[str]:
    """The folder of each class, in class order; CloobError listing missing and unexpected folders."""
    n, by = len(spec.classes), spec.layout.by
    missing: list[str] = []     # named missing folders
    unexpected: list[str] = []  # named unexpected folders
    short = extra = 0           # for wnid / sorted: how many too few / too many (names unknowable)
    out: list[str] = []
    if by == "name":
        how = spec.layout.normalize
        have: dict[str, list[str]] = {}
        for f in folders:
            have.setdefault(normalize(f, how), []).append(f)
        expected = spec.expected_folders()
        keys = {normalize(e, how) for e in expected}
        for e in expected:
            got = have.get(normalize(e, how), [])
            if len(got) > 1:
                raise CloobError(f"{spec.name}: folders {got} in {where} all match class folder {e!r} "
                                 f"(normalize={how})", "remove the duplicates, or use normalize: exact")
            if got:
                out.append(got[0])
            else:
                missing.append(e)
        unexpected = [f for f in folders if normalize(f, how) not in keys]
    elif by == "index":
        have_i: dict[int, list[str]] = {}
        for f in folders:
            if f.isdigit():
                have_i.setdefault(int(f), []).append(f)
            else:
                unexpected.append(f)
        for i in range(n):
            got = have_i.get(i, [])
            if len(got) > 1:
                raise CloobError(f"{spec.name}: folders {got} in {where} all stand for class {i}",
                                 "remove the duplicates")
            if got:
                out.append(got[0])
            else:
                missing.append(str(i))
        unexpected += sorted((f for i, fs in have_i.items() if i >= n for f in fs), key=int)
    else:
        candidates = folders
        if by == "wnid":
            unexpected = [f for f in folders if not _WNID.match(f)]
            candidates = [f for f in folders if _WNID.match(f)]
        out = sorted(candidates)
        short, extra = max(0, n - len(out)), max(0, len(out) - n)
        if by == "sorted" and not short and not extra:
            _check_numeric_order(spec, out, where)
    if missing or unexpected or short or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_preview(missing)}")
        if short:
            parts.append(f"{short} too few (which ones cannot be told from folder names)")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_preview(unexpected)}")
        if extra:
            parts.append(f"{extra} too many (which ones cannot be told from folder names)")
        raise CloobError(f"{spec.name}: the class folders in {where} do not match the spec "
                         f"({n} expected, {_describe(spec)}; found {len(folders)}): " + "; ".join(parts),
                         "check that the source is the right archive/folder (and complete); if the archive is "
                         "right, fix layout (root, by, normalize) or folders/classes in the spec")
    return out


def _check_numeric_order(spec: DownstreamSpec, folders: list[str], where: str) -> None:
    # Integer folder names sorted as strings put 10 before 2: almost surely not the class order meant.
    if all(f.isdigit() for f in folders) and sorted(folders, key=int) != folders:
        raise CloobError(f"{spec.name}: the class folders in {where} are numbers ({_preview(folders)}), and sorted "
                         "as text they are out of numeric order, so layout.by: sorted would mislabel them",
                         "use layout.by: index in the spec (folder k holds class k)")


def class_table(spec: DownstreamSpec, scan: Scan, rel: str, where: str) -> dict:
    """The manifest's class part for the class folders under rel: classes (index, name, folder, images),
    num_classes, images, image_bytes; CloobError if the folders do not match or a class has no images."""
    folders = match_classes(spec, scan.subdirs[rel], where)
    table = [{"index": i, "name": c, "folder": f, "images": scan.images[scan.child(rel, f)]}
             for i, (c, f) in enumerate(zip(spec.classes, folders))]
    empty = [r["folder"] for r in table if r["images"] == 0]
    if empty:
        raise CloobError(f"{spec.name}: {len(empty)} class folder(s) in {where} hold no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}): {_preview(empty)}",
                         "check that the source is complete; a class without images cannot be evaluated")
    return {"classes": table, "num_classes": len(table), "images": sum(r["images"] for r in table),
            "image_bytes": sum(scan.nbytes[scan.child(rel, f)] for f in folders)}
