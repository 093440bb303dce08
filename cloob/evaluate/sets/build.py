"""A downstream set's folder, built from its source and published under <out>/<name>/: an archive
(downloaded with size and sha256 checks, extracted safely), generated images, or a folder the user
supplies (pointed to locally, uploaded to an object store). Each returns the manifest's class part."""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from cloob.evaluate.sets import archive
from cloob.evaluate.sets.folders import Scan, class_table, find_root
from cloob.storage import Location

log = logging.getLogger("cloob.evaluate.sets")


def say(progress: bool, msg: str) -> None:
    """Log msg, and print it to stderr when progress is on."""
    log.info(msg)
    if progress:
        print(msg, file=sys.stderr)


def build_from_archive(spec, url: str, out: Location, cache: Path, progress: bool, timeout: float) -> dict:
    path, sha = archive.download(url, size=spec.source.size, sha256=spec.source.sha256, cache_dir=cache,
                                 timeout=timeout, progress=progress)
    size = path.stat().st_size
    if spec.source.sha256 is None:
        say(progress, f"{spec.name}: archive {archive.redact(url)}: {size} bytes, sha256 {sha}\n"
                      f"  pin it in the spec: source.size: {size}, source.sha256: {sha}")
    # Extract next to the final folder (same file system: the publish is one rename) or, for an
    # object store, next to the cache.
    if out.is_local:
        os.makedirs(out.root, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=out.root))
    else:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".extract-{spec.name}-", dir=cache))
    try:
        archive.safe_extract(path, work, progress=progress)
        scan = Scan(work)
        where = f"archive {path.name}"
        rel = find_root(spec, scan, where)
        manifest = class_table(spec, scan, rel, f"{where}:{rel}")
        manifest.update({"archive": {"filename": archive.url_filename(url), "size": size, "sha256": sha},
                         "root": rel, "external_root": None})
        _publish(work, out.sub(spec.name), progress)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_generated(spec, out: Location, cache: Path, progress: bool) -> dict:
    from cloob.data import synthetic

    parent = out.root if out.is_local else cache
    os.makedirs(parent, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=parent))
    try:
        say(progress, f"{spec.name}: generating {spec.source.per_class} images for each of {len(spec.classes)} classes")
        synthetic.write_class_folders(work, spec.source.per_class, seed=spec.source.seed or 0,
                                      classes=spec.class_names)
        scan = Scan(work)
        manifest = class_table(spec, scan, ".", f"generated {spec.name}")
        manifest.update({"archive": None, "root": ".", "external_root": None})
        _publish(work, out.sub(spec.name), progress)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_supplied(spec, src: Path, out: Location, progress: bool) -> dict:
    ds = out.sub(spec.name)
    scan = Scan(src)
    rel = find_root(spec, scan, str(src))
    class_root = src if rel == "." else src / rel
    manifest = class_table(spec, scan, rel, str(class_root))
    manifest["archive"] = None
    if out.is_local:
        # No copy of the (large) images: the manifest points at the supplied folder. Nothing is
        # deleted here: the supplied folder may well lie inside <out>/<name>/.
        os.makedirs(ds.root, exist_ok=True)
        manifest.update({"root": None, "external_root": str(class_root)})
    else:
        dest_name = posixpath.basename(str(class_root)) or "images"
        _upload(class_root, ds, dest_name, progress)
        manifest.update({"root": dest_name, "external_root": None})
    return manifest


def _publish(work: Path, ds: Location, progress: bool) -> None:
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
        _upload(work, ds, "", progress)


def _upload(local: Path, ds: Location, rel: str, progress: bool) -> None:
    """Copy a local folder's contents to rel in the set's folder, after clearing that folder."""
    # Clear what an earlier (possibly interrupted) run left, so stale files never mix in.
    ds.remove("", recursive=True)
    say(progress, f"uploading {local} -> {ds.url(rel)}")
    ds.copy_in(str(local), rel)
