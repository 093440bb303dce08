"""Where a checkpoint came from, read from what training wrote (no torch): the checkpoint folder a
reference means, the run's recipe, and the pretraining dataset's manifest. Everything is read
through cloob.storage.Location, so it works on any store a run lives on."""

from __future__ import annotations

import posixpath

from cloob.errors import CloobError
from cloob.storage import Location, redact


def read_json(url: str) -> dict | None:
    """The JSON file at url, or None if it is missing, damaged or cannot be reached: lineage is
    recorded where it can be found, and never stops a registration or an evaluation."""
    try:
        return Location(url).read_json()
    except (OSError, ValueError):
        return None


def read_recipe(run_dir: str) -> dict | None:
    """The recipe a run wrote (recipe.yaml, parsed), or None if it is missing or cannot be read."""
    import yaml

    try:
        with Location(run_dir).open("recipe.yaml", "r") as f:
            return yaml.safe_load(f)
    except (OSError, ValueError):  # FileNotFoundError is an OSError; ValueError: a bad URL or encoding
        return None


def resolve_checkpoint(ref: str) -> str:
    """The checkpoint folder a reference means: itself, or a run's latest complete checkpoint."""
    from cloob.train.checkpoint import META_FILE, CheckpointStore

    ref = ref.rstrip("/")
    try:
        loc = Location(ref)
        exists = loc.exists()
    except (OSError, ValueError, ImportError) as e:
        raise CloobError(f"cannot reach {redact(ref)}: {type(e).__name__}: {e}",
                         "check the URL, network and credentials (AWS_* environment or config)") from None
    if not exists:
        raise CloobError(f"model {redact(ref)} does not exist",
                         "give a checkpoint folder, a run folder, or ARCH=<weights file> for open_clip weights")
    if loc.exists(META_FILE):
        return ref
    latest = CheckpointStore(ref).latest()
    if latest is not None:
        return latest.url
    if loc.isfile():
        raise CloobError(f"{redact(ref)} is a file, not one of our checkpoints",
                         f"for open_clip weights name the architecture: RN50={ref} (see `cloob models`)")
    raise CloobError(f"{redact(ref)} holds no complete checkpoint (no meta.json, no checkpoints/step_*/meta.json)",
                     "point at a run folder or a checkpoints/step_NNNNNNNN folder of a finished save")


def pretraining_data(run_dir: str) -> tuple[str | None, str | None]:
    """(dataset name, content hash) of the data a run trained on, from its recipe and the dataset
    manifest when the data was made by `cloob prepare`; else the data folder's name."""
    recipe = read_recipe(run_dir) or {}
    data = recipe.get("data") or {}
    train = (data.get("train") or "").rstrip("/")
    if data.get("content_hash"):
        # Keyed by its data (cloob.run.state.identify): the hash the run trained on, whatever the folder
        # holds by now; the name from the manifest where it is still there.
        manifest = read_json(posixpath.join(train, "_cloob", "manifest.json")) if train and "{" not in train else None
        name = ((manifest or {}).get("spec") or {}).get("name") or (manifest or {}).get("name")
        return name or posixpath.basename(train) or None, data["content_hash"]
    if not train:
        return None, None
    manifest = read_json(posixpath.join(train, "_cloob", "manifest.json")) if "{" not in train else None
    if manifest:
        name = (manifest.get("spec") or {}).get("name") or manifest.get("name")
        return name or posixpath.basename(train), manifest.get("content_hash")
    return posixpath.basename(train) or train, None




def run_lineage(meta: dict, recipe: dict | None) -> dict:
    """A registry entry's data version and parent, from what the run recorded: `data_version` (the
    version's name, e.g. mytable-v2, where the launcher resolved one) and `parent` (the model a warm
    start began from, train.init_from: its entry id, checkpoint and what was asked for), else None."""
    data = (recipe or {}).get("data") or {}
    init = meta.get("init_from") or {}
    parent = None
    if init.get("sha256"):
        parent = {"id": init.get("entry") or init["sha256"], "sha256": init["sha256"],
                  "checkpoint_uri": redact(init.get("checkpoint") or "") or None, "ref": init.get("ref")}
    return {"data_version": (meta.get("data") or {}).get("version") or data.get("version"), "parent": parent}
