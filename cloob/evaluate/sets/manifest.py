"""A prepared set's files: items.tsv (every test image and its class index, relative to the set's
root) and manifest.json (how the set was read and paired, its counts and warnings), written last:
its presence means the folder is complete and checked. Reading them back, and where the images are."""

from __future__ import annotations

import hashlib
import posixpath

from cloob.errors import CloobError
from cloob.storage import Location

MANIFEST = "manifest.json"
ITEMS = "items.tsv"
MANIFEST_FORMAT = "cloob.downstream/2"


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
    """Where the images of a prepared dataset are: inside the dataset folder, or the user-supplied
    folder that a local manifest points to."""
    if manifest.get("root") is not None:
        rel = manifest["root"]
        return dataset_uri if rel == "." else posixpath.join(dataset_uri, rel)
    return manifest["external_root"]


def items_bytes(items: list[tuple[str, int]]) -> bytes:
    return "".join(f"{p}\t{c}\n" for p, c in items).encode()


def read_items(ds: Location, manifest: dict) -> list[tuple[str, int]]:
    """The prepared set's (image path relative to its root, class index), checked against the
    manifest's digest."""
    name = manifest.get("name", ds.root)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CloobError(f"{name}: {ds.url()} was prepared by an older version of cloob (manifest format "
                         f"{manifest.get('format')!r}), whose class pairing was not verified",
                         f"prepare it again: cloob prepare-downstream {name} --force --out <root>")
    try:
        blob = ds.read_bytes(manifest["items"])
    except (OSError, KeyError):
        raise CloobError(f"{name}: {ds.url(ITEMS)} is missing", f"prepare it again: cloob prepare-downstream "
                         f"{name} --force --out <root>") from None
    if hashlib.sha256(blob).hexdigest() != manifest.get("items_sha256"):
        raise CloobError(f"{name}: {ds.url(manifest['items'])} does not match the sha256 in its manifest",
                         "the file was changed or damaged: prepare it again with --force")
    out = []
    for line in blob.decode().splitlines():
        p, _, c = line.rpartition("\t")
        out.append((p, int(c)))
    return out
