"""A prepared set's manifest.json (written last: its presence means the folder is complete and
checked): reading it, and where the set's class folders are."""

from __future__ import annotations

import json
import posixpath

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "cloob.downstream/1"


def output_fs(out: str):
    import fsspec

    from cloob.storage import is_local

    fs, root = fsspec.core.url_to_fs(out)
    return fs, root.rstrip("/"), is_local(fs)


def read_manifest_file(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: treat as absent and prepare again


def read_manifest(out: str, name: str) -> dict | None:
    """The manifest of `<out>/<name>/`, or None if that dataset is not (completely) prepared."""
    fs, root, _ = output_fs(out)
    return read_manifest_file(fs, posixpath.join(root, name, MANIFEST))


def dataset_root(manifest: dict, dataset_uri: str) -> str:
    """Where the class folders of a prepared dataset are: inside the dataset folder, or the
    user-supplied folder that a local manifest points to."""
    if manifest.get("root") is not None:
        rel = manifest["root"]
        return dataset_uri if rel == "." else posixpath.join(dataset_uri, rel)
    return manifest["external_root"]
