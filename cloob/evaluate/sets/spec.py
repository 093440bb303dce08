"""A zero-shot evaluation set's spec (data_specs/downstream/<name>.yaml): validation, loading by name
or path, the shipped list, and its content hash.

A spec names the source (an archive to download, or a folder the user supplies), where the class
folders lie inside it, how folders map to classes, the class names, the prompt templates and the
main metric. Folder -> class mappings (`layout.by`):

    name    folder == class name, or == folders[i] when `folders` is given (parallel to `classes`),
            compared after `layout.normalize`: exact | casefold | alnum_casefold (letters and digits
            only, case-folded: "Apply_Eye Makeup" == "ApplyEyeMakeup")
    index   folders are the integers 0..N-1; folder k holds class k ("007" counts as 7)
    wnid    N folders named n########; class i is the i-th in sorted order (ImageNet)
    sorted  class i is the i-th folder in sorted order, as torchvision's ImageFolder numbers them;
            for archives whose folder names are not documented: only their number is checked
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

from cloob.data.spec import SPECS_DIR as _PRETRAIN_SPECS_DIR
from cloob.data.spec import read_spec_file, shipped_specs
from cloob.errors import CloobError

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
    by: Literal["name", "index", "wnid", "sorted"]
    normalize: Literal["exact", "casefold", "alnum_casefold"] = "exact"


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
            if self.layout.by != "name":
                raise ValueError("`folders` is only meaningful with layout.by: name")
            if len(self.folders) != len(self.classes):
                raise ValueError(f"`folders` has {len(self.folders)} entries, `classes` {len(self.classes)}: "
                                 "they are parallel lists")
        if self.layout.by == "name":
            keys = [normalize(f, self.layout.normalize) for f in self.expected_folders()]
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:
                raise ValueError(f"folder names collide after normalize={self.layout.normalize}: {dup[:5]}")
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def expected_folders(self) -> list[str]:
        """For by: name, the folder name of each class (before normalisation)."""
        return list(self.folders) if self.folders is not None else list(self.classes)


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
    try:
        return DownstreamSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise CloobError(f"downstream spec {path}: {field + ': ' if field else ''}{msg}",
                         f"fix {field or 'the spec'} (see data_specs/downstream/*.yaml; "
                         f"{len(e.errors())} problem(s) in all)") from None
