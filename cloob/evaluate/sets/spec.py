"""A zero-shot evaluation set's spec (data_specs/downstream/<name>.yaml): validation, loading by name
or path, the shipped list, and its content hash.

A spec names the source (an archive to download, a folder the user supplies, or generated images),
the layouts its distributions come in, the class names (in the dataset's own label order), the prompt
templates, the main metric and the published size of the test split. How class folders are paired
with classes (`layout.by`) is always verified, never positional:

    name    a folder names its class: compared after `layout.normalize` (exact | casefold |
            alnum_casefold: letters and digits only, case-folded, so "Coopers_Hawk" == "Cooper's Hawk")
            with the class name, its entry in `folders` (a parallel list of the dataset's own folder
            names) or one of its `aliases`. With `layout.numbers` set, folders named by an integer
            are the dataset's published class ids too (GTSRB's 00000..00042: numbers 0; Flowers102's
            1..102: numbers 1).
    index   folders are the integers 0..N-1 (ImageNetV2): folder k holds class k
    wnid    folders are WordNet ids n########: class i is the one named `folders[i]` (ImageNet's 1000 wnids
            in sorted order, the standard index), or without `folders` the i-th in sorted order

Label files (`layouts`, see cloob/evaluate/sets/labels.py) pair images with classes through the
dataset's published mapping (GTSRB's ClassId, Flowers102's 1-based labels, Stanford Cars' class ids
checked by name against cars_meta.mat, ImageNet's devkit ids and wnids); split files (Birdsnap's
test_images.txt, UCF101's testlist01.txt, CoOp's split JSON) pick the test images from class folders.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloob.errors import CloobError
from cloob.names import check_name
from cloob.specfile import SPECS_DIR as _PRETRAIN_SPECS_DIR
from cloob.specfile import read_spec_file, shipped_specs

SPECS_DIR = _PRETRAIN_SPECS_DIR / "downstream"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Strict):
    kind: Literal["download", "user-supplied", "generated"]
    url: str | None = None
    generator: Literal["shapes"] | None = Field(None, description="for kind: generated, what makes the images "
                                                                  "(shapes: cloob.data.synthetic.write_class_folders)")
    per_class: int = Field(20, ge=1, description="for kind: generated, images per class")
    seed: int | None = Field(None, ge=0, description="for kind: generated, the generator's seed (null: 0); another "
                                                     "seed draws other pictures of the same classes (a validation split)")
    size: int | None = Field(None, gt=0, description="archive size in bytes; null: recorded at download")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    instructions: str | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.kind == "download" and not self.url:
            raise ValueError("a download source needs `url`")
        if self.kind == "generated" and not self.generator:
            raise ValueError("a generated source needs `generator` (shapes)")
        if self.kind == "user-supplied" and not self.instructions:
            raise ValueError("a user-supplied source needs `instructions` (what to get and how to arrange it)")
        return self


class Layout(_Strict):
    root: str = Field("auto", description="folder holding the class folders, relative to the archive "
                                          "(or supplied folder) root; 'auto' finds it")
    split: str | None = Field(None, description="with root: auto, prefer a path with this component")
    by: Literal["name", "index", "wnid"]
    normalize: Literal["exact", "casefold", "alnum_casefold"] = "exact"
    numbers: Literal[0, 1] | None = Field(None, description="with by: name, class folders named by an integer are "
                                                           "the dataset's class ids, counted from this number")

    @field_validator("by", mode="before")
    @classmethod
    def _no_positional(cls, by):
        if by == "sorted":
            raise ValueError("`by: sorted` (class i = the i-th folder in sorted order) is not supported any more: "
                             "a positional pairing cannot be verified and silently mislabels sets whose order "
                             "differs. Pair by name (by: name, with `folders` or `aliases` for the dataset's own "
                             "folder names), by published class ids (numbers: 0 | 1), or by wnid")
        return by


LayoutName = Literal["class_folders", "gtsrb_csv", "flowers_mat", "cars_mat", "imagenet_devkit", "imagenet_loc"]


@functools.cache
def _open_clip_lists() -> dict[str, list[str]]:
    meta = sys.modules.get("open_clip.zero_shot_metadata")
    if meta is None:
        # The module is plain data with no imports: load it on its own rather than through
        # `import open_clip`, which imports torch (about 10 s cold) just to read 1000 names.
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("classes_from/templates_from need open_clip, which is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
        mod_spec = importlib.util.spec_from_file_location("_cloob_open_clip_zero_shot_metadata", path)
        meta = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(meta)
    # open_clip's templates are lambdas; called with "{}" they give the equivalent format string.
    return {"open_clip.imagenet": list(meta.IMAGENET_CLASSNAMES),
            "open_clip.openai_imagenet": [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES],
            "open_clip.simple_imagenet": [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]}


class DownstreamSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    title: str
    homepage: str
    description: str = ""
    source: Source
    layout: Layout
    main_metric: Literal["top1", "mean_per_class_recall"]
    classes: list[str] = Field(min_length=2)
    classes_from: Literal["open_clip.imagenet"] | None = None
    folders: list[str] | None = None
    aliases: list[list[str]] | None = Field(None, description="parallel to classes: other names of each class "
                                                              "that verify a class folder (e.g. scientific names)")
    layouts: list[LayoutName] = Field(default_factory=lambda: ["class_folders"], min_length=1,
                                       description="the forms the set's distributions come in, tried in order")
    split_files: list[str] = Field(default_factory=list, description="names of files that list the test split's "
                                   "images (test_images.txt, testlist01.txt, split_*.json): applied when present")
    test_size: int | None = Field(None, gt=0, description="images in the published test split; a prepared set far "
                                  "from it is flagged")
    templates: list[str] = Field(min_length=1)
    templates_from: Literal["open_clip.openai_imagenet", "open_clip.simple_imagenet"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve_lists(cls, data: Any):
        # `classes_from` / `templates_from` fill the lists, so the validated model (and its hash)
        # always holds the actual names and templates.
        if isinstance(data, dict) and (data.get("classes_from") or data.get("templates_from")):
            data = dict(data)
            lists = _open_clip_lists()
            for key in ("classes", "templates"):
                src = data.get(f"{key}_from")
                if src in lists and data.get(key) is None:
                    data[key] = list(lists[src])
        return data

    @field_validator("templates")
    @classmethod
    def _format_strings(cls, templates: list[str]) -> list[str]:
        for t in templates:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' for the class name")
            try:
                t.format("x")
            except (IndexError, KeyError, ValueError):
                raise ValueError(f"template {t!r} is not a format string with one '{{}}' "
                                 "(write literal braces as '{{' and '}}')") from None
        return templates

    @field_validator("classes")
    @classmethod
    def _non_empty(cls, classes: list[str]) -> list[str]:
        if any(not c.strip() for c in classes):
            raise ValueError("a class name is empty")
        return classes

    @model_validator(mode="after")
    def _consistent(self):
        lists = None
        for key in ("classes", "templates"):
            src = getattr(self, f"{key}_from")
            if src is not None:
                lists = lists or _open_clip_lists()
                if getattr(self, key) != lists[src]:
                    raise ValueError(f"`{key}` differs from `{key}_from: {src}`: give one of them")
        if self.folders is not None:
            if self.layout.by == "index":
                raise ValueError("`folders` is only meaningful with layout.by: name or wnid")
            if len(self.folders) != len(self.classes):
                raise ValueError(f"`folders` has {len(self.folders)} entries, `classes` {len(self.classes)}: "
                                 "they are parallel lists")
        if self.aliases is not None and len(self.aliases) != len(self.classes):
            raise ValueError(f"`aliases` has {len(self.aliases)} entries, `classes` {len(self.classes)}: "
                             "they are parallel lists")
        if self.layout.by == "name":
            owner: dict[str, int] = {}
            for i, names in enumerate(self.names_of_classes()):
                for n in names:
                    k = normalize(n, self.layout.normalize)
                    if owner.setdefault(k, i) != i:
                        raise ValueError(f"names of two classes collide after normalize={self.layout.normalize}: "
                                         f"{self.classes[owner[k]]!r} and {self.classes[i]!r} (both {k!r})")
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def expected_folders(self) -> list[str]:
        """For by: name, the folder name of each class (before normalisation)."""
        return list(self.folders) if self.folders is not None else list(self.classes)

    def class_by_name(self, how: str | None = None) -> dict[str, int]:
        """{a name of a class, normalised (`how`, default layout.normalize): its index} over every name
        that verifies a class (names_of_classes)."""
        how = how or self.layout.normalize
        return {normalize(n, how): i for i, names in enumerate(self.names_of_classes()) for n in names}

    def names_of_classes(self) -> list[list[str]]:
        """Every name that verifies each class: the class name, its folder name, its aliases."""
        out = []
        for i, c in enumerate(self.classes):
            names = [c] + ([self.folders[i]] if self.folders is not None else [])
            names += list(self.aliases[i]) if self.aliases is not None else []
            out.append(list(dict.fromkeys(names)))
        return out


def normalize(name: str, how: str) -> str:
    name = unicodedata.normalize("NFC", name)
    if how == "casefold":
        return name.casefold()
    if how == "alnum_casefold":
        return "".join(c for c in name.casefold() if c.isalnum())
    return name


def spec_hash(spec: DownstreamSpec) -> str:
    """sha256 of the validated spec's canonical JSON (resolved class names and templates included)."""
    data = spec.model_dump(mode="json")
    if data["source"].get("seed") is None:  # the field is newer than the sets prepared without it
        data["source"].pop("seed", None)
    for key, default in (("aliases", None), ("split_files", []), ("test_size", None), ("layouts", ["class_folders"])):
        if data.get(key) == default:  # newer fields at their defaults leave the hash of older specs as it was
            data.pop(key, None)
    if data["layout"].get("numbers") is None:
        data["layout"].pop("numbers", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def list_downstream_specs(generated: bool = False) -> list[str]:
    """The shipped specs: the paper's eight sets, plus the generated ones if asked."""
    names = shipped_specs(SPECS_DIR)
    if generated:
        return names
    return [n for n in names if load_downstream_spec(n).source.kind != "generated"]


def load_downstream_spec(name_or_path: str | Path | DownstreamSpec) -> DownstreamSpec:
    """A shipped spec by name (data_specs/downstream/<name>.yaml) or a YAML file by path."""
    if isinstance(name_or_path, DownstreamSpec):
        return name_or_path
    data, path = read_spec_file(name_or_path, SPECS_DIR, "downstream spec", "data_specs/downstream/flowers102.yaml")
    if isinstance(data, dict) and "name" in data:  # <out>/<name>/: checked before anything is fetched
        check_name(data["name"], "downstream set name")
    try:
        return DownstreamSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise CloobError(f"downstream spec {path}: {field + ': ' if field else ''}{msg}",
                         f"fix {field or 'the spec'} (see data_specs/downstream/*.yaml; "
                         f"{len(e.errors())} problem(s) in all)") from None
