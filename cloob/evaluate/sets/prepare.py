"""`prepare_downstream`: prepare one evaluation set under <out>/<name>/ (download or generate it, or
read the user's folder or archive, in any layout the set comes in; verify how every class is paired;
write items.tsv and, last, the manifest), or find its manifest for the same spec and source and do
nothing."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from pathlib import Path

from cloob.errors import CloobError
from cloob.evaluate.sets import archive
from cloob.evaluate.sets.build import build_from_archive, build_from_folder, build_generated, say
from cloob.evaluate.sets.manifest import ITEMS, MANIFEST, MANIFEST_FORMAT, items_bytes, manifest_of
from cloob.evaluate.sets.reading import SHOWN, Reading
from cloob.evaluate.sets.spec import DownstreamSpec, load_downstream_spec, spec_hash
from cloob.storage import Location, redact


def _summary(manifest: dict, uri: str, seconds: float, reused: bool) -> dict:
    arch = manifest.get("archive") or {}
    return {"name": manifest["name"], "uri": uri, "images": manifest["images"],
            "classes": manifest["num_classes"], "bytes": arch.get("size", manifest.get("image_bytes")),
            "seconds": round(seconds, 3), "sha256": arch.get("sha256"), "reused": reused,
            "layout": manifest.get("layout"), "split": manifest.get("split"),
            "expected_images": manifest.get("expected_images"), "warnings": manifest.get("warnings", []),
            "pairs": [f"{c['name']!r} <- {c['source']} ({c['how']})" for c in manifest["classes"][:SHOWN]]}


def prepare_downstream(name_or_spec: str | Path | DownstreamSpec, out: str, *, source: str | None = None,
                       split: str | None = None, force: bool = False, progress: bool = True,
                       cache_dir: str | Path | None = None, timeout: float = 60.0) -> dict:
    """Prepare one evaluation set under `<out>/<name>/` (out: a folder or any fsspec URL).

    source: a folder holding the set in any of its layouts (extracted, or with the distribution's
    archives beside their label files), or an archive (URL or local path: a mirror, an offline copy);
    None: the spec's own download. split: another split than the spec's (flagged in every result).
    Returns {name, uri, images, classes, bytes, seconds, sha256, reused, layout, split, warnings, pairs}.
    """
    t0 = time.monotonic()
    spec = load_downstream_spec(name_or_spec)
    digest = spec_hash(spec)
    out_loc = Location(out)
    ds = out_loc.sub(spec.name)
    ds_uri = ds.url()

    folder = None
    if source and "://" not in source and Path(source).expanduser().is_dir():
        folder = Path(source).expanduser().resolve()
        source_id = {"kind": "folder", "path": str(folder)}
    elif spec.source.kind == "generated":
        source_id = {"kind": spec.source.kind, "generator": spec.source.generator, "per_class": spec.source.per_class}
    elif spec.source.kind == "user-supplied" and not source:
        raise CloobError(f"{spec.name} must be supplied by you: {spec.source.instructions.strip()}",
                         f"pass the folder: --source {spec.name}=/path/to/folder")
    else:
        url = source or spec.source.url
        if "://" not in url and not Path(url).expanduser().exists():
            raise CloobError(f"{spec.name}: the source {url} does not exist",
                             f"pass a folder or an archive of {spec.name}: --source {spec.name}=/path")
        source_id = {"kind": "archive", "url": redact(url)}
    if split:
        source_id["split"] = split

    old = manifest_of(ds)
    if (not force and old is not None and old.get("format") == MANIFEST_FORMAT and old.get("spec_sha256") == digest
            and old.get("source") == source_id):
        return _summary(old, ds_uri, time.monotonic() - t0, reused=True)

    cache = Path(cache_dir) if cache_dir else archive.default_cache_dir()
    if folder is not None:
        reading, where = build_from_folder(spec, folder, out_loc, cache, progress, split)
    elif spec.source.kind == "generated":
        reading, where = build_generated(spec, out_loc, cache, progress)
    else:
        reading, where = build_from_archive(spec, url, out_loc, cache, progress, timeout, split)
    shown_spec = spec.model_dump(mode="json")
    if shown_spec["source"].get("url"):
        shown_spec["source"]["url"] = redact(shown_spec["source"]["url"])  # no credentials
    blob = items_bytes(reading.items)
    ds.write_bytes(ITEMS, blob)
    manifest = {"format": MANIFEST_FORMAT, "name": spec.name, "title": spec.title, "spec_sha256": digest,
                "source": source_id, "main_metric": spec.main_metric, **_reading_part(spec, reading, where),
                "items": ITEMS, "items_sha256": hashlib.sha256(blob).hexdigest(),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "tool_version": _code_version(), "spec": shown_spec}
    # Written last: its presence means the folder is complete and checked.
    ds.write_json(MANIFEST, manifest, indent=1, ensure_ascii=False)
    summary = _summary(manifest, ds_uri, time.monotonic() - t0, reused=False)
    say(progress, f"{spec.name}: {summary['images']} images in {summary['classes']} classes ({reading.layout}) "
                  f"-> {ds_uri}")
    for w in reading.warnings:
        say(progress, f"{spec.name}: warning: {w}")
    return summary


def _reading_part(spec: DownstreamSpec, reading: Reading, where: dict) -> dict:
    """The manifest's account of what was read: layout, split, every class's pairing and count."""
    hows = sorted({c["how"] for c in reading.classes})
    return {"layout": reading.layout, "pairing": hows, "split": reading.split, "classes": reading.classes,
            "num_classes": len(reading.classes), "images": len(reading.items),
            "image_bytes": reading.image_bytes, "expected_images": spec.test_size, "warnings": reading.warnings, **where}


def _code_version() -> str:
    from cloob.version import code_version

    return code_version()
