"""A prepared set's manifest.json (written last: its presence means the folder is complete and
checked): reading it, and where the set's class folders are."""

from __future__ import annotations

import posixpath

from cloob.storage import Location

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "cloob.downstream/1"


def manifest_of(ds: Location) -> dict | None:
    """The manifest in a set's folder, or None if it has none (not, or not completely, prepared) or
    one that cannot be read (then the set is prepared again)."""
    try:
        return ds.read_json(MANIFEST)
    except (OSError, ValueError):
        return None


def read_manifest(out: str, name: str) -> dict | None:
    """The manifest of `<out>/<name>/`, or None if that dataset is not (completely) prepared."""
    return manifest_of(Location(out).sub(name))


def dataset_root(manifest: dict, dataset_uri: str) -> str:
    """Where the class folders of a prepared dataset are: inside the dataset folder, or the
    user-supplied folder that a local manifest points to."""
    if manifest.get("root") is not None:
        rel = manifest["root"]
        return dataset_uri if rel == "." else posixpath.join(dataset_uri, rel)
    return manifest["external_root"]
