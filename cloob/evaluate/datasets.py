"""Evaluation sets, read from a local folder or any fsspec URL.

Zero-shot classification sets come in four shapes, all checked against a downstream spec (class
names, templates, main metric, how images are paired with classes):
    prepared    a folder made by `cloob prepare-downstream` (its items.tsv lists each image's class)
    folders     the set as the user has it, in any layout its spec knows (class folders, label files),
                read by the same code as preparation (cloob.evaluate.sets.reading.read_set)
    archive     a local archive of the set: unpacked and prepared once into the cache, then as prepared
    shards      webdataset shards (*.tar): an image (jpg/jpeg/png/webp) and its class index in `cls`
Retrieval sets are webdataset shards of captioned images (`txt`), as `cloob prepare` writes them.

Images are decoded in DataLoader workers. An unreadable image (corrupt, truncated, not an image) is
not an error: it is skipped and counted, and the count goes into the results row.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from cloob.data.remote import open_shard
from cloob.data.workers import loader_kwargs
from cloob.errors import CloobError
from cloob.evaluate.sets.build import is_archive
from cloob.evaluate.sets.manifest import MANIFEST, dataset_root, read_items
from cloob.evaluate.sets.reading import read_set
from cloob.evaluate.sets.spec import DownstreamSpec, load_downstream_spec, spec_hash
from cloob.evaluate.sets.tree import Tree
from cloob.storage import Location

Image.MAX_IMAGE_PIXELS = 89_478_485  # a decompression bomb is a corrupt image, not a crash
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_BAD = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


@dataclass
class ClassificationSet:
    name: str
    uri: str
    spec: DownstreamSpec
    kind: str  # prepared | folders | shards
    items: list[tuple[str, int]] = field(default_factory=list)  # (image URL, class index) for folders
    shards: list[str] = field(default_factory=list)
    identity: str = ""  # sha256 over the spec and the listed files (names and sizes)
    warnings: list[str] = field(default_factory=list)  # what a result on it must carry (count, split)

    @property
    def main_metric(self) -> str:
        return self.spec.main_metric

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class RetrievalSet:
    name: str
    uri: str
    shards: list[str]
    identity: str


def _location(uri: str) -> Location:
    try:
        return Location(uri)
    except (ValueError, ImportError) as e:
        raise CloobError(f"cannot open {uri!r}: {e}", "give a local folder or an fsspec URL (s3://bucket/path)") from None


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _shards(loc: Location) -> tuple[list[str], list[tuple[str, int]]]:
    """The shards loc is (one .tar) or holds (its *.tar): (URLs, [(file name, size)])."""
    if loc.root.endswith(".tar"):
        rels = [""]
    elif loc.isdir():
        rels = loc.glob("*.tar", hidden=True)
    else:
        rels = []
    return [loc.url(r) for r in rels], [(posixpath.basename(loc.path(r)), loc.size(r)) for r in rels]


def open_classification_set(spec: str | DownstreamSpec, uri: str) -> ClassificationSet:
    """Resolve `uri` (prepared folder, class folders or shards) for the downstream spec `spec`."""
    spec = load_downstream_spec(spec)
    loc = _location(uri)
    try:
        exists = loc.exists()
    except OSError as e:
        raise CloobError(f"{spec.name}: cannot reach {uri}: {type(e).__name__}: {e}",
                         "check the URL, network and credentials (AWS_* environment or config)") from None
    if not exists:
        raise CloobError(f"{spec.name}: eval set {uri} does not exist",
                         f"prepare it: cloob prepare-downstream {spec.name} --out <downstream root>, "
                         "or point at a folder of class folders / webdataset shards")
    digest = spec_hash(spec)
    shards, sizes = _shards(loc)
    if shards:
        return ClassificationSet(spec.name, uri, spec, "shards", shards=shards, identity=_digest(digest, sizes))
    if loc.is_local and os.path.isfile(loc.root) and is_archive(loc.root):
        return _prepared_in_cache(spec, loc.root)

    manifest = loc.read_json(MANIFEST) if loc.isdir() else None
    if manifest is not None:
        names = [c["name"] for c in manifest["classes"]]
        if names != spec.class_names:
            raise CloobError(f"{spec.name}: {uri} was prepared with other class names than the spec has now",
                             f"prepare it again: cloob prepare-downstream {spec.name} --force --out <root>")
        root = _location(dataset_root(manifest, loc.url()))
        listed = read_items(loc, manifest)
        items = [(root.url(p), c) for p, c in listed]
        identity = _digest(digest, manifest["items_sha256"], manifest.get("image_bytes"))
        return ClassificationSet(spec.name, uri, spec, "prepared", items=items, identity=identity,
                                 warnings=list(manifest.get("warnings") or []))
    if not loc.isdir():
        raise CloobError(f"{spec.name}: {uri} is neither a folder of the set nor webdataset shards nor an archive",
                         "point at the set's folder (class folders or its label files), its archive, or *.tar shards")
    tree = Tree(loc)
    if loc.is_local and not tree.images and any("/" not in p and is_archive(p) for p in tree.sizes):
        return _prepared_in_cache(spec, loc.root)  # the distribution's archives beside their label files
    if not tree.sizes:
        raise CloobError(f"{spec.name}: {uri} holds no class folders and no *.tar shards (empty dataset)",
                         f"point at the folder with one folder per class ({len(spec.classes)} for {spec.name})")
    reading = read_set(spec, tree, uri)
    items = [(loc.url(p), c) for p, c in reading.items]
    listing = [(p, tree.sizes[p]) for p, _ in reading.items]
    return ClassificationSet(spec.name, uri, spec, "folders", items=items,
                             identity=_digest(digest, listing, reading.split), warnings=reading.warnings)


def _prepared_in_cache(spec: DownstreamSpec, path: str) -> ClassificationSet:
    """A local archive of the set, or a folder holding its archives still packed: prepared once into the
    cache (keyed by the path, size and time), through the same code as `cloob prepare-downstream --source`."""
    from cloob.evaluate.sets.archive import default_cache_dir
    from cloob.evaluate.sets.prepare import prepare_downstream

    st = os.stat(path)
    key = hashlib.sha256(json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:16]
    out = str(default_cache_dir() / "sets" / key)
    summary = prepare_downstream(spec, out, source=path, progress=False)
    ds = open_classification_set(spec, summary["uri"])
    ds.uri = path
    return ds


def open_retrieval_set(uri: str, name: str | None = None) -> RetrievalSet:
    loc = _location(uri)
    if not loc.exists():
        raise CloobError(f"retrieval set {uri} does not exist",
                         "point at webdataset shards of captioned images (e.g. made by `cloob prepare`)")
    shards, sizes = _shards(loc)
    if not shards:
        raise CloobError(f"retrieval set {uri} holds no *.tar shards (empty dataset)",
                         "point at a folder of webdataset shards with an image and a `txt` caption per sample")
    return RetrievalSet(name or posixpath.basename(loc.root) or "retrieval", uri, shards, _digest("retrieval", sizes))


# ------------------------------------------------------------------------------------------ reading

def _decode(data: bytes, transform):
    try:
        with Image.open(io.BytesIO(data)) as im:
            return transform(im.convert("RGB"))
    except _BAD:
        return None


class _Files(Dataset):
    """(image tensor or None if unreadable, label, index) for a list of (URL, label)."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        url, label = self.items[i]
        try:
            if "://" in url:
                with fsspec.open(url, "rb") as f:
                    data = f.read()
            else:  # a local path: skip fsspec's per-file machinery (~0.1 ms an image)
                with open(url, "rb") as f:
                    data = f.read()
        except FileNotFoundError:
            data = b""  # vanished since listing: count it with the unreadable ones
        return _decode(data, self.transform), label, i


class _Shards(IterableDataset):
    """Samples of webdataset shards, split across DataLoader workers shard by shard.

    Yields (image tensor or None, target, index) where target is the `cls` integer (-1 if absent or
    not an integer) or the `txt` caption ("" if absent).
    """

    def __init__(self, shards: list[str], transform, target: str):
        self.shards, self.transform, self.target = shards, transform, target

    def __iter__(self) -> Iterator:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for s_idx, url in enumerate(self.shards):
            if s_idx % nw != wid:
                continue
            # From a bucket: one streaming GET, reopened at the byte where a dropped connection broke
            # (cloob.data.remote), so a reset mid-shard loses no image.
            with open_shard(url) as stream:
                # A damaged shard stops at its first unreadable member: what came before still counts.
                samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}],
                                                          handler=_stop_on_error))
                for n, sample in enumerate(samples):
                    yield self._item(sample, s_idx, n)

    def _item(self, sample: dict, s_idx: int, n: int):
        key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
        image = _decode(sample[key], self.transform) if key else None
        if self.target == "cls":
            try:
                target = int(sample["cls"].decode().strip())
            except (KeyError, ValueError, UnicodeDecodeError, AttributeError):
                target = -1
        else:
            try:
                target = sample.get("txt", b"").decode("utf-8").strip()
            except UnicodeDecodeError:
                target = ""
        return image, target, (s_idx << 32) | n


def _stop_on_error(exn: Exception) -> bool:
    import logging

    logging.getLogger(__name__).warning("unreadable shard data skipped: %s", exn)
    return False


def collate(batch):
    """Stack the readable images; report which were unreadable."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[2] for b in batch if b[0] is None]
    images = torch.stack([b[0] for b in good]) if good else None
    targets = [b[1] for b in good]
    return {"images": images, "targets": targets, "index": [b[2] for b in good], "bad": bad}


LOADER_TIMEOUT_S = 600.0  # the longest wait for one batch, worker start included (a fork server imports torch)


class loader:
    """Batches of `ds` from `workers` worker processes (0: this process), never waiting more than
    `timeout_s` for one: a stuck worker or a storage that stops answering ends the evaluation with one
    error instead of a hang. Workers are never forked from a threaded process (worker_context)."""

    def __init__(self, ds: Dataset | IterableDataset, batch_size: int, workers: int,
                 timeout_s: float = LOADER_TIMEOUT_S, what: str = "the eval set"):
        if isinstance(ds, _Shards):
            workers = min(workers, len(ds.shards))
        self.timeout_s, self.what = timeout_s, what
        self.dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                             persistent_workers=False, prefetch_factor=4 if workers else None,
                             timeout=timeout_s if workers else 0, **loader_kwargs(workers))

    def __iter__(self):
        it = iter(self.dl)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                raise CloobError(f"no batch of {self.what} came from its DataLoader workers within "
                                 f"{self.timeout_s:.0f} s", "a worker is stuck or the storage stopped "
                                 "answering: check the path and network, then rerun (finished pairs are kept)"
                                 ) from None
            yield batch


def classification_data(ds: ClassificationSet, transform, limit: int | None, seed: int):
    """The dataset to load, and its number of images (None if unknown before reading: shards, where
    the reader stops after `limit`)."""
    if ds.kind == "shards":
        return _Shards(ds.shards, transform, "cls"), None
    items = ds.items
    if limit is not None and limit < len(items):
        # A seeded random subset, in listing order: the first N would be only the first classes.
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return _Files(items, transform), len(items)


def retrieval_data(rs: RetrievalSet, transform):
    return _Shards(rs.shards, transform, "txt")


def image_names(data, uri: str, shards: list[str], index: list[int]) -> list[str]:
    """Each scored image's name in its set (its identity for pairing two models' outcomes): its path
    under the set's folder, or `<shard file>#<n>` for the n-th sample of a shard (`index` as the
    readers above number the images: a list position, or shard << 32 | sample)."""
    items = getattr(data, "items", None)
    if items is not None:
        root = uri.rstrip("/") + "/"
        return [u[len(root):] if u.startswith(root) else u for u, _ in (items[i] for i in index)]
    return [f"{posixpath.basename(shards[i >> 32])}#{i & 0xFFFFFFFF}" for i in index]
