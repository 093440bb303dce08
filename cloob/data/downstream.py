"""Zero-shot evaluation sets: their specs (data_specs/downstream/*.yaml) and their preparation.

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

`prepare_downstream` downloads (cache, size and sha256 checks), extracts safely, checks the class
folders against the spec, and publishes `<out>/<name>/` with `manifest.json` written last: a folder
without a manifest is unfinished, and a manifest is the complete, checked class -> folder pairing
with per-class image counts. A rerun with the same spec and source finds the manifest and does
nothing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import cloob
from cloob.data import archive
from cloob.data.spec import read_spec_file, shipped_specs
from cloob.errors import CloobError

log = logging.getLogger(__name__)

SPECS_DIR = Path(cloob.__file__).resolve().parent.parent / "data_specs" / "downstream"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "cloob.downstream/1"
# What torchvision's ImageFolder loads (compared case-insensitively), so counts equal what it sees.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")
_SHOWN = 10  # how many missing / unexpected folders an error lists


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Source(_Strict):
    kind: Literal["download", "user-supplied", "generated"]
    url: str | None = None
    generator: Literal["shapes"] | None = Field(None, description="for kind: generated, what makes the images "
                                                                  "(shapes: cloob.data.synthetic.write_class_folders)")
    per_class: int = Field(20, ge=1, description="for kind: generated, images per class")
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
    blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
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


# ------------------------------------------------------------------------------- scanning and checks

class _Scan:
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


def _class_like(spec: DownstreamSpec, folders: list[str], scan: _Scan, rel: str) -> tuple[bool, int]:
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


def _find_root(spec: DownstreamSpec, scan: _Scan, where: str) -> str:
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


# ------------------------------------------------------------------------------------------ preparation

def _fs(out: str):
    import fsspec

    from cloob.storage import is_local

    fs, root = fsspec.core.url_to_fs(out)
    return fs, root.rstrip("/"), is_local(fs)


def _read_manifest(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: treat as absent and prepare again


def read_manifest(out: str, name: str) -> dict | None:
    """The manifest of `<out>/<name>/`, or None if that dataset is not (completely) prepared."""
    fs, root, _ = _fs(out)
    return _read_manifest(fs, posixpath.join(root, name, MANIFEST))


def dataset_root(manifest: dict, dataset_uri: str) -> str:
    """Where the class folders of a prepared dataset are: inside the dataset folder, or the
    user-supplied folder that a local manifest points to."""
    if manifest.get("root") is not None:
        rel = manifest["root"]
        return dataset_uri if rel == "." else posixpath.join(dataset_uri, rel)
    return manifest["external_root"]


def _summary(manifest: dict, uri: str, seconds: float, reused: bool) -> dict:
    arch = manifest.get("archive") or {}
    return {"name": manifest["name"], "uri": uri, "images": manifest["images"],
            "classes": manifest["num_classes"], "bytes": arch.get("size", manifest.get("image_bytes")),
            "seconds": round(seconds, 3), "sha256": arch.get("sha256"), "reused": reused}


def _say(progress: bool, msg: str) -> None:
    log.info(msg)
    if progress:
        print(msg, file=sys.stderr)


def prepare_downstream(name_or_spec: str | Path | DownstreamSpec, out: str, *, source: str | None = None,
                       force: bool = False, progress: bool = True, cache_dir: str | Path | None = None,
                       timeout: float = 60.0) -> dict:
    """Prepare one evaluation set under `<out>/<name>/` (out: a folder or any fsspec URL).

    source: for a download spec, another URL or a local path of the same archive (a mirror, an
    offline copy); for a user-supplied spec (imagenet), the local folder with the class folders.
    Returns {name, uri, images, classes, bytes, seconds, sha256, reused}.
    """
    t0 = time.monotonic()
    spec = load_downstream_spec(name_or_spec)
    digest = spec_hash(spec)
    fs, root, local_out = _fs(out)
    ds_path = posixpath.join(root, spec.name)
    ds_uri = ds_path if local_out else fs.unstrip_protocol(ds_path)
    manifest_path = posixpath.join(ds_path, MANIFEST)

    if spec.source.kind == "user-supplied":
        if not source:
            raise CloobError(f"{spec.name} must be supplied by you: {spec.source.instructions.strip()}",
                             f"pass the folder: --source {spec.name}=/path/to/folder")
        src_path = Path(source).expanduser().resolve()
        if not src_path.is_dir():
            raise CloobError(f"{spec.name}: the supplied folder {src_path} does not exist or is not a folder",
                             f"pass the folder with the class folders: --source {spec.name}=/path/to/val\n"
                             f"{spec.source.instructions.strip()}")
        source_id = {"kind": spec.source.kind, "path": str(src_path)}
    elif spec.source.kind == "generated":
        source_id = {"kind": spec.source.kind, "generator": spec.source.generator, "per_class": spec.source.per_class}
    else:
        url = source or spec.source.url
        source_id = {"kind": spec.source.kind, "url": archive.redact(url)}

    old = _read_manifest(fs, manifest_path)
    if (not force and old is not None and old.get("spec_sha256") == digest
            and old.get("source") == source_id):
        return _summary(old, ds_uri, time.monotonic() - t0, reused=True)

    cache = Path(cache_dir) if cache_dir else archive.default_cache_dir()
    if spec.source.kind == "user-supplied":
        manifest = _prepare_supplied(spec, src_path, fs, ds_path, local_out, progress)
    elif spec.source.kind == "generated":
        manifest = _prepare_generated(spec, fs, root, ds_path, local_out, cache, progress)
    else:
        manifest = _prepare_archive(spec, url, fs, root, ds_path, local_out, cache, progress, timeout)
    shown_spec = spec.model_dump(mode="json")
    if shown_spec["source"].get("url"):
        shown_spec["source"]["url"] = archive.redact(shown_spec["source"]["url"])  # no credentials
    manifest = {"format": MANIFEST_FORMAT, "name": spec.name, "title": spec.title, "spec_sha256": digest,
                "source": source_id, "main_metric": spec.main_metric, "mapping": spec.layout.by, **manifest,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "tool_version": _code_version(), "spec": shown_spec}
    from cloob.storage import atomic_write_bytes

    # Written last: its presence means the folder is complete and checked.
    atomic_write_bytes(manifest_path if local_out else fs.unstrip_protocol(manifest_path),
                       json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    summary = _summary(manifest, ds_uri, time.monotonic() - t0, reused=False)
    _say(progress, f"{spec.name}: {summary['images']} images in {summary['classes']} classes -> {ds_uri}")
    return summary


def _code_version() -> str:
    from cloob.version import code_version

    return code_version()


def _class_table(spec: DownstreamSpec, scan: _Scan, rel: str, where: str) -> dict:
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


def _prepare_archive(spec, url, fs, root, ds_path, local_out, cache: Path, progress, timeout) -> dict:
    path, sha = archive.download(url, size=spec.source.size, sha256=spec.source.sha256, cache_dir=cache,
                                 timeout=timeout, progress=progress)
    size = path.stat().st_size
    if spec.source.sha256 is None:
        _say(progress, f"{spec.name}: archive {archive.redact(url)}: {size} bytes, sha256 {sha}\n"
                       f"  pin it in the spec: source.size: {size}, source.sha256: {sha}")
    # Extract next to the final folder (same file system: the publish is one rename) or, for an
    # object store, next to the cache.
    if local_out:
        os.makedirs(root, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=root))
    else:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".extract-{spec.name}-", dir=cache))
    try:
        archive.safe_extract(path, work, progress=progress)
        scan = _Scan(work)
        where = f"archive {path.name}"
        rel = _find_root(spec, scan, where)
        manifest = _class_table(spec, scan, rel, f"{where}:{rel}")
        manifest.update({"archive": {"filename": archive.url_filename(url), "size": size, "sha256": sha},
                         "root": rel, "external_root": None})
        _publish(work, fs, ds_path, local_out, progress)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare_generated(spec, fs, root, ds_path, local_out, cache: Path, progress) -> dict:
    from cloob.data import synthetic

    parent = root if local_out else cache
    os.makedirs(parent, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=parent))
    try:
        _say(progress, f"{spec.name}: generating {spec.source.per_class} images for each of {len(spec.classes)} classes")
        synthetic.write_class_folders(work, spec.source.per_class, classes=spec.class_names)
        scan = _Scan(work)
        manifest = _class_table(spec, scan, ".", f"generated {spec.name}")
        manifest.update({"archive": None, "root": ".", "external_root": None})
        _publish(work, fs, ds_path, local_out, progress)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare_supplied(spec, src: Path, fs, ds_path, local_out, progress) -> dict:
    scan = _Scan(src)
    rel = _find_root(spec, scan, str(src))
    class_root = src if rel == "." else src / rel
    manifest = _class_table(spec, scan, rel, str(class_root))
    manifest["archive"] = None
    if local_out:
        # No copy of the (large) images: the manifest points at the supplied folder. Nothing is
        # deleted here: the supplied folder may well lie inside <out>/<name>/.
        os.makedirs(ds_path, exist_ok=True)
        manifest.update({"root": None, "external_root": str(class_root)})
    else:
        dest_name = posixpath.basename(str(class_root)) or "images"
        _upload(class_root, fs, posixpath.join(ds_path, dest_name), fs_clear=ds_path, progress=progress)
        manifest.update({"root": dest_name, "external_root": None})
    return manifest


def _publish(work: Path, fs, ds_path: str, local_out: bool, progress: bool) -> None:
    if local_out:
        # Swap the finished folder in. The old version (with its manifest) moves aside first, so a
        # crash leaves the old folder, no folder, or the new one without a manifest: never a manifest
        # over a mix of old and new files.
        if os.path.lexists(ds_path):
            aside = f"{os.path.dirname(ds_path)}/.{os.path.basename(ds_path)}.old-{uuid.uuid4().hex[:8]}"
            os.replace(ds_path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(work, ds_path)
        os.chmod(ds_path, 0o755)  # mkdtemp makes it 0700
    else:
        _upload(work, fs, ds_path, fs_clear=ds_path, progress=progress)


def _upload(local: Path, fs, dest: str, *, fs_clear: str, progress: bool) -> None:
    # Clear what an earlier (possibly interrupted) run left, so stale files never mix in.
    if fs.exists(fs_clear):
        fs.rm(fs_clear, recursive=True)
    _say(progress, f"uploading {local} -> {fs.unstrip_protocol(dest)}")
    fs.put(str(local).rstrip("/") + "/", dest, recursive=True)
