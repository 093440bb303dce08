"""Reading an evaluation set's source in whatever layout the user has it: which images are in the
test split, and which class each one is, paired by name or by a published mapping, never by position.

`read_set(spec, tree)` tries the spec's layouts (class folders, label files) in order and returns a
Reading: the (image, class) items, how every class was paired, how the split was chosen, and the
warnings a result computed from it must carry (a count far from the published test size, a split
other than test). Preparation (prepare.py) records it in the set's manifest; `cloob evaluate --data`
reads a folder through the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cloob.errors import CloobError
from cloob.evaluate.sets.spec import DownstreamSpec
from cloob.evaluate.sets.tree import Tree

SHOWN = 8  # pairs, folders or files an error or a summary lists
_FAR = 0.01  # a prepared count this far (relative) from the published test size is flagged
_TOO_MANY = 1.1  # more than this times the published test size cannot be the test split: refused


@dataclass
class Reading:
    layout: str                                # what was found, in words
    items: list[tuple[str, int]]               # (image path relative to the tree's top, class index)
    classes: list[dict]                        # per class: index, name, source, how
    split: dict                                # name, how it was chosen, images left out
    warnings: list[str] = field(default_factory=list)
    image_bytes: int = 0

    def count_per_class(self) -> list[int]:
        counts = [0] * len(self.classes)
        for _, c in self.items:
            counts[c] += 1
        return counts


def preview(items: list[str], n: int = SHOWN) -> str:
    items = list(items)
    head = ", ".join(items[:n])
    return (head + f", ... ({len(items)} in all)") if len(items) > n else (head or "(nothing)")


def read_set(spec: DownstreamSpec, tree: Tree, where: str, split: str | None = None) -> Reading:
    """The set as `tree` holds it, in the first of the spec's layouts that is there; CloobError when
    none is, or when one is there but cannot be verified (it names the problem and the fix)."""
    from cloob.evaluate.sets.folders import read_class_folders
    from cloob.evaluate.sets.labels import READERS, describe

    readers = {"class_folders": read_class_folders, **READERS}
    found = None
    for name in spec.layouts:
        found = readers[name](spec, tree, where, split)
        if found is not None:
            break
    if found is None:
        forms = "; ".join(describe(spec, n) for n in spec.layouts)
        raise CloobError(f"{spec.name}: {where} is in none of the layouts {spec.name} comes in (its top level "
                         f"holds: {preview(tree.top_level())})",
                         f"point at a copy in one of these forms: {forms}")
    found.items.sort(key=lambda pc: (pc[1], pc[0]))  # class order, then path: stable for seeded subsets
    _check(spec, found, where)
    found.image_bytes = sum(tree.sizes.get(p, 0) for p, _ in found.items)
    return found


def _check(spec: DownstreamSpec, r: Reading, where: str) -> None:
    if not r.items:
        raise CloobError(f"{spec.name}: {where} ({r.layout}) holds no images of the {r.split['name']} split",
                         "check that the download or copy is complete")
    counts = r.count_per_class()
    empty = [spec.classes[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise CloobError(f"{spec.name}: {len(empty)} classes have no image in {where} ({r.layout}): "
                         f"{preview(empty)}", "check that the source is complete; a class without images "
                         "cannot be evaluated")
    for c, n in zip(r.classes, counts):
        c["images"] = n
    n, expected = len(r.items), spec.test_size
    published = spec.layout.split or "test"
    if expected and n > _TOO_MANY * expected and r.split["name"] == published:
        lists = f": put {' or '.join(spec.split_files)} beside the images" if spec.split_files else ""
        raise CloobError(f"{spec.name}: {where} ({r.layout}) holds {n} images where {spec.name}'s {published} split "
                         f"has {expected}: images of other splits are in it, and a number on them would be wrong",
                         f"point at a copy of the {published} split only, or at the distribution with its split "
                         f"file{lists}")
    if r.split["name"] != published:
        r.warnings.append(f"evaluated on the {r.split['name']!r} split, not the published "
                          f"{spec.layout.split or 'test'!r} split: not comparable with the paper")
    if expected and abs(n - expected) > _FAR * expected:
        if n < expected:
            r.warnings.append(f"{n} images where the published test split has {expected}: {expected - n} "
                              f"({100 * (expected - n) / expected:.1f}%) missing (dead links upstream, a partial "
                              "copy or another split)")
        else:
            r.warnings.append(f"{n} images where the published test split has {expected}: {n - expected} more "
                              "(training images or another split may be included)")
