"""`prepare_downstream`: prepare one evaluation set under <out>/<name>/ (download or generate or take
the user's folder, check the class folders against the spec, publish, write the manifest last), or
find its manifest for the same spec and source and do nothing."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from cloob.errors import CloobError
from cloob.evaluate.sets import archive
from cloob.evaluate.sets.build import build_from_archive, build_generated, build_supplied, say
from cloob.evaluate.sets.manifest import MANIFEST, MANIFEST_FORMAT, manifest_of
from cloob.evaluate.sets.spec import DownstreamSpec, load_downstream_spec, spec_hash
from cloob.storage import Location


def _summary(manifest: dict, uri: str, seconds: float, reused: bool) -> dict:
    arch = manifest.get("archive") or {}
    return {"name": manifest["name"], "uri": uri, "images": manifest["images"],
            "classes": manifest["num_classes"], "bytes": arch.get("size", manifest.get("image_bytes")),
            "seconds": round(seconds, 3), "sha256": arch.get("sha256"), "reused": reused}


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
    out_loc = Location(out)
    ds = out_loc.sub(spec.name)
    ds_uri = ds.url()

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

    old = manifest_of(ds)
    if (not force and old is not None and old.get("spec_sha256") == digest
            and old.get("source") == source_id):
        return _summary(old, ds_uri, time.monotonic() - t0, reused=True)

    cache = Path(cache_dir) if cache_dir else archive.default_cache_dir()
    if spec.source.kind == "user-supplied":
        manifest = build_supplied(spec, src_path, out_loc, progress)
    elif spec.source.kind == "generated":
        manifest = build_generated(spec, out_loc, cache, progress)
    else:
        manifest = build_from_archive(spec, url, out_loc, cache, progress, timeout)
    shown_spec = spec.model_dump(mode="json")
    if shown_spec["source"].get("url"):
        shown_spec["source"]["url"] = archive.redact(shown_spec["source"]["url"])  # no credentials
    manifest = {"format": MANIFEST_FORMAT, "name": spec.name, "title": spec.title, "spec_sha256": digest,
                "source": source_id, "main_metric": spec.main_metric, "mapping": spec.layout.by, **manifest,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "tool_version": _code_version(), "spec": shown_spec}
    # Written last: its presence means the folder is complete and checked.
    ds.write_json(MANIFEST, manifest, indent=1, ensure_ascii=False)
    summary = _summary(manifest, ds_uri, time.monotonic() - t0, reused=False)
    say(progress, f"{spec.name}: {summary['images']} images in {summary['classes']} classes -> {ds_uri}")
    return summary


def _code_version() -> str:
    from cloob.version import code_version

    return code_version()
