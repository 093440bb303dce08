"""A downstream set's folder, built from its source and published under <out>/<name>/: an archive
(downloaded with size and sha256 checks, extracted safely), a folder (the user's copy, extracted or
still holding the distribution's archives), or generated images. Every source is read by the same
reader (reading.read_set); each builder returns the Reading and the manifest's location part."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from cloob.errors import CloobError
from cloob.evaluate.sets import archive
from cloob.evaluate.sets.reading import Reading, read_set
from cloob.evaluate.sets.tree import Tree
from cloob.storage import Location, redact

log = logging.getLogger("cloob.evaluate.sets")
_ARCHIVE_ENDINGS = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def say(progress: bool, msg: str) -> None:
    """Log msg, and print it to stderr when progress is on."""
    log.info(msg)
    if progress:
        print(msg, file=sys.stderr)


def is_archive(path: str) -> bool:
    return path.lower().endswith(_ARCHIVE_ENDINGS)


def _work_dir(spec, out: Location, cache: Path) -> Path:
    # Next to the final folder (same file system: the publish is one rename) or, for an object
    # store, next to the cache.
    parent = out.root if out.is_local else cache
    os.makedirs(parent, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=parent))


def build_from_archive(spec, url: str, out: Location, cache: Path, progress: bool, timeout: float,
                       split: str | None) -> tuple[Reading, dict]:
    path, sha = archive.download(url, size=spec.source.size, sha256=spec.source.sha256, cache_dir=cache,
                                 timeout=timeout, progress=progress)
    size = path.stat().st_size
    if spec.source.sha256 is None:
        say(progress, f"{spec.name}: archive {redact(url)}: {size} bytes, sha256 {sha}\n"
                      f"  pin it in the spec: source.size: {size}, source.sha256: {sha}")
    work = _work_dir(spec, out, cache)
    try:
        archive.safe_extract(path, work, progress=progress)
        reading = read_set(spec, Tree(str(work)), f"archive {path.name}", split)
        _publish(work, out.sub(spec.name), reading, progress)
        return reading, {"archive": {"filename": archive.url_filename(url), "size": size, "sha256": sha},
                         "root": ".", "external_root": None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_generated(spec, out: Location, cache: Path, progress: bool) -> tuple[Reading, dict]:
    from cloob.data import synthetic

    work = _work_dir(spec, out, cache)
    try:
        say(progress, f"{spec.name}: generating {spec.source.per_class} images for each of {len(spec.classes)} classes")
        synthetic.write_class_folders(work, spec.source.per_class, seed=spec.source.seed or 0,
                                      classes=spec.class_names)
        reading = read_set(spec, Tree(str(work)), f"generated {spec.name}")
        _publish(work, out.sub(spec.name), reading, progress)
        return reading, {"archive": None, "root": ".", "external_root": None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_from_folder(spec, src: Path, out: Location, cache: Path, progress: bool,
                      split: str | None) -> tuple[Reading, dict]:
    """A folder the user has: read where it lies (a local output gets only the manifest and item list
    pointing at it, no copy), or, when it holds the distribution's archives still packed (Flowers102's
    102flowers.tgz beside its .mat files), unpacked with its loose files into the set's folder."""
    tree = Tree(str(src))
    packed = [p for p in tree.sizes if "/" not in p and is_archive(p)]
    if packed and not tree.images:
        return _build_unpacked(spec, src, tree, packed, out, cache, progress, split)
    reading = read_set(spec, tree, str(src), split)
    ds = out.sub(spec.name)
    if out.is_local:
        # Nothing is deleted here: the supplied folder may well lie inside <out>/<name>/.
        os.makedirs(ds.root, exist_ok=True)
        return reading, {"archive": None, "root": None, "external_root": str(src)}
    _upload_items(src, ds, reading, progress)
    return reading, {"archive": None, "root": ".", "external_root": None}


def _build_unpacked(spec, src: Path, tree: Tree, packed: list[str], out: Location, cache: Path,
                    progress: bool, split: str | None) -> tuple[Reading, dict]:
    work = _work_dir(spec, out, cache)
    try:
        for rel in packed:
            say(progress, f"{spec.name}: unpacking {rel}")
            archive.safe_extract(src / rel, work, progress=progress)
        for rel in tree.sizes:  # the loose files (label and split files) beside the archives
            if rel not in packed:
                dest = work / rel
                if dest.exists():
                    raise CloobError(f"{spec.name}: {src / rel} is also inside {', '.join(packed)}",
                                     "keep one copy of it in the folder")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, dest)
        reading = read_set(spec, Tree(str(work)), f"{src} (with {', '.join(packed)} unpacked)", split)
        _publish(work, out.sub(spec.name), reading, progress)
        return reading, {"archive": None, "root": ".", "external_root": None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(work: Path, ds: Location, reading: Reading, progress: bool) -> None:
    if ds.is_local:
        # Swap the finished folder in. The old version (with its manifest) moves aside first, so a
        # crash leaves the old folder, no folder, or the new one without a manifest: never a manifest
        # over a mix of old and new files.
        ds_path = ds.root
        if os.path.lexists(ds_path):
            aside = f"{os.path.dirname(ds_path)}/.{os.path.basename(ds_path)}.old-{uuid.uuid4().hex[:8]}"
            os.replace(ds_path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(work, ds_path)
        os.chmod(ds_path, 0o755)  # mkdtemp makes it 0700
    else:
        _upload_items(work, ds, reading, progress)


def _upload_items(local: Path, ds: Location, reading: Reading, progress: bool) -> None:
    """Copy the set's images (only those of the split) to the set's folder, after clearing it."""
    # Clear what an earlier (possibly interrupted) run left, so stale files never mix in.
    ds.remove("", recursive=True)
    say(progress, f"uploading {len(reading.items)} images {local} -> {ds.url()}")
    paths = [p for p, _ in reading.items]
    ds.fs.put([str(local / p) for p in paths], [ds.path(p) for p in paths])
