"""Step checkpoints on any fsspec URL, written so that a crash never leaves a usable-looking half.

Layout of one checkpoint, `<run_dir>/checkpoints/step_00001000/`:
    open_clip_pytorch_model.bin   the model's state_dict only: open_clip.create_model_and_transforms(
                                  arch, pretrained=<this file>) loads it strictly
    open_clip_config.json         {"model_cfg", "preprocess_cfg"}: `local-dir:<folder>` loads it too
    train_state.pt                optimizer, grad scaler, step, epoch, RNG and data positions per rank
    meta.json                     written LAST: its presence marks the checkpoint complete; holds the
                                  step, why it was written (`reason`: scheduled, stopped or final),
                                  the recipe hash, metrics, `files` (sha256 and size of each
                                  file above) and `model_sha256` (the checkpoint's id in the registry
                                  and the results table)
Every file is written atomically through cloob.storage.Location: to a temporary name and renamed
on a local disk, one PUT on an object store. Listings are read afresh each time (other processes,
torchrun's ranks, write checkpoints while a supervisor lists them). Folders without meta.json are
incomplete and ignored by resume. A file that does not match its digest, or is missing, is one
CloobError naming it: on resume (with the older checkpoint to fall back to), on evaluation and on
registration. Checkpoints written before `files` existed are checked by the model file's sha256
alone. A kill in the middle of a write leaves a `.tmp-*` file; `remove_temp_files` sweeps them when
the run starts again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import shlex
import uuid
from dataclasses import dataclass

from cloob import plain_data
from cloob.errors import CloobError
from cloob.storage import Location, redact

MODEL_FILE = "open_clip_pytorch_model.bin"
CONFIG_FILE = "open_clip_config.json"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"step_(\d{8})$")
# The names cloob.storage's atomic writes give their temporary files: mkstemp's prefix ".tmp-",
# 8 random characters, then "-<final name>".
_TEMP_FILE = re.compile(r"^\.tmp-[a-z0-9_]+-.")
_CHUNK = 1 << 22


def torch_bytes(obj) -> bytes:
    import torch  # here, not at the top: listing checkpoints (registry, evaluation) needs no torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(data: bytes) -> dict:
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


class DamagedCheckpoint(CloobError):
    """A checkpoint file is missing or does not match its digest in meta.json."""

    def __init__(self, url: str, name: str, what: str, fix: str | None = None):
        self.url, self.name, self.what = url, name, what
        super().__init__(f"checkpoint file {redact(posixpath.join(url, name))} {what}",
                         fix or "the checkpoint is damaged: use another one, or train again")

    def with_fix(self, fix: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(self.url, self.name, self.what, fix)


def read_meta(url: str) -> dict:
    """A checkpoint folder's meta.json, or DamagedCheckpoint if it cannot be read as JSON."""
    try:
        meta = json.loads(Location(url).read_bytes(META_FILE))
    except FileNotFoundError:
        raise DamagedCheckpoint(url, META_FILE, "is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(url, META_FILE, f"is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(url, META_FILE, "is not a JSON object")
    return meta


def expected_files(meta: dict) -> dict[str, dict]:
    """{file name: {"sha256", "bytes"}} that meta.json vouches for. Checkpoints written before
    per-file digests carry the model file's alone."""
    if isinstance(meta.get("files"), dict):
        return meta["files"]
    if "model_sha256" in meta:
        return {MODEL_FILE: {"sha256": meta["model_sha256"], "bytes": meta.get("model_bytes")}}
    return {}


def _check(url: str, name: str, meta: dict, sha: str | None, size: int | None) -> None:
    want = expected_files(meta).get(name)
    if want is None:
        return
    if size is not None and want.get("bytes") is not None and size != want["bytes"]:
        raise DamagedCheckpoint(url, name, f"has {size} bytes where meta.json records {want['bytes']}")
    if sha is not None and sha != want["sha256"]:
        raise DamagedCheckpoint(url, name, "does not match its sha256 in meta.json")


def read_verified(url: str, name: str, meta: dict) -> bytes:
    """One file of the checkpoint at url, checked against meta.json."""
    try:
        data = Location(url).read_bytes(name)
    except FileNotFoundError:
        raise DamagedCheckpoint(url, name, "is missing") from None
    _check(url, name, meta, sha256_bytes(data), len(data))
    return data


def verify_files(url: str, meta: dict, *, hashed: set[str] | None = None) -> None:
    """Every file meta.json lists exists with its recorded size; those in `hashed` (all by default)
    are also read and compared with their sha256."""
    loc = Location(url)
    for name in expected_files(meta):
        try:
            size = loc.size(name)
            _check(url, name, meta, None, size)
            if hashed is None or name in hashed:
                h = hashlib.sha256()
                with loc.open(name, "rb") as f:
                    for chunk in iter(lambda: f.read(_CHUNK), b""):
                        h.update(chunk)
                _check(url, name, meta, h.hexdigest(), None)
        except FileNotFoundError:
            raise DamagedCheckpoint(url, name, "is missing") from None


def remove_temp_files(run_dir: str) -> list[str]:
    """Delete the temporary files that a kill in the middle of an atomic write left in a local run
    folder, its checkpoints/ and their step folders. Call it before the run writes anything (and
    while it alone writes there): a live writer's temporary file looks the same. On an object store
    a write is one PUT and leaves nothing behind. Returns the removed paths."""
    loc = Location(run_dir)
    if not loc.is_local or not loc.isdir():
        return []
    steps = [f"checkpoints/{d}" for d in loc.list("checkpoints", kind="directory", hidden=True) if _STEP_DIR.search(d)]
    removed = []
    for folder in ("", "checkpoints", *steps):
        path = loc.path(folder)
        # os.scandir, not a listing: a symbolic link named like a temporary file is not ours to delete.
        for entry in os.scandir(path) if os.path.isdir(path) else ():
            if _TEMP_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
                rel = posixpath.join(folder, entry.name)
                loc.remove(rel)  # gone already (another sweep): nothing to do
                removed.append(loc.path(rel))
    return removed


@dataclass(frozen=True)
class CheckpointRef:
    url: str  # the checkpoint folder
    step: int

    @property
    def model_url(self) -> str:
        return posixpath.join(self.url, MODEL_FILE)

    def meta(self) -> dict:
        return read_meta(self.url)


class CheckpointStore:
    """The checkpoints of one run, under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str):
        self.root = posixpath.join(run_dir.rstrip("/"), "checkpoints")  # as given (may be relative)
        self.loc = Location(self.root)
        self.fs = self.loc.fs

    def complete(self) -> list[CheckpointRef]:
        """The complete checkpoints (those with meta.json), oldest first, listed afresh."""
        refs = []
        for name in self.loc.list():
            m = _STEP_DIR.search(name)
            if m and self.loc.exists(f"{name}/{META_FILE}"):
                refs.append(CheckpointRef(self.loc.url(name), int(m.group(1))))
        return sorted(refs, key=lambda r: r.step)

    def latest(self) -> CheckpointRef | None:
        refs = self.complete()
        return refs[-1] if refs else None

    def save(self, step: int, model_state: dict, model_cfg: dict, train_state: dict, meta: dict,
             keep: int) -> CheckpointRef:
        name = f"step_{step:08d}"
        ck = self.loc.sub(name)
        files = {MODEL_FILE: torch_bytes(model_state), CONFIG_FILE: json.dumps(model_cfg, indent=2).encode(),
                 STATE_FILE: torch_bytes(train_state)}
        for file, data in files.items():
            ck.write_bytes(file, data)
        model = file_digest(files[MODEL_FILE])
        meta = {**meta, "step": step, "model_file": MODEL_FILE, "model_sha256": model["sha256"],
                "model_bytes": model["bytes"], "files": {n: file_digest(d) for n, d in files.items()},
                "id": uuid.uuid4().hex}
        ck.write_json(META_FILE, meta, indent=2)  # last: its presence marks the checkpoint complete
        self._prune(keep)
        return self.ref(step)

    def ref(self, step: int) -> CheckpointRef:
        """Where the checkpoint of `step` is (the ranks that do not write it name it so)."""
        return CheckpointRef(posixpath.join(self.root, f"step_{step:08d}"), step)

    def _prune(self, keep: int) -> None:
        for ref in self.complete()[:-keep]:
            name = posixpath.basename(ref.url)
            # meta.json first: a crash mid-delete leaves an incomplete folder, never a false complete one.
            self.loc.remove(f"{name}/{META_FILE}")
            self.loc.remove(name, recursive=True)

    @staticmethod
    def load(ref: CheckpointRef, map_location="cpu") -> tuple[dict, dict, dict]:
        """(model state_dict, train state, meta) to resume from, every file checked against meta.json
        and read as plain data (cloob.plain_data: nothing in a run folder can run code). A damaged
        checkpoint is one DamagedCheckpoint whose fix names the checkpoint to fall back to."""
        try:
            meta = ref.meta()
            model_bytes = read_verified(ref.url, MODEL_FILE, meta)
            state_bytes = read_verified(ref.url, STATE_FILE, meta)
            verify_files(ref.url, meta, hashed={CONFIG_FILE})
            loaded = []
            for name, data in ((MODEL_FILE, model_bytes), (STATE_FILE, state_bytes)):
                # Unpickling garbage can raise anything; a damaged file gets here only without a digest.
                try:
                    loaded.append(plain_data.load(data, map_location, numpy_rng=name == STATE_FILE))
                except Exception as e:  # noqa: BLE001
                    raise DamagedCheckpoint(ref.url, name, plain_data.why_not_loaded(e),
                                            _HOSTILE if plain_data.refused_global(e) else None) from None
        except DamagedCheckpoint as e:
            fix = _fallback_fix(ref)
            raise e.with_fix(f"{e.fix}; {fix}" if e.fix == _HOSTILE else fix) from None
        return loaded[0], loaded[1], meta


# A checkpoint that asks to run code was not written by `cloob train`, whose files are plain data.
_HOSTILE = ("`cloob train` writes only plain data, so someone else wrote this file: check who can write "
            "this run folder and resume only from run folders you trust")


def _fallback_fix(ref: CheckpointRef) -> str:
    """How to resume without the damaged checkpoint: move it out of checkpoints/ and rerun, which
    resumes from the next older complete one."""
    root = posixpath.dirname(ref.url.rstrip("/"))
    run_dir = posixpath.dirname(root)
    aside = posixpath.join(run_dir, f"damaged-{posixpath.basename(ref.url.rstrip('/'))}")
    move = (f"mv {shlex.quote(ref.url)} {shlex.quote(aside)}" if "://" not in ref.url
            else f"move the objects under {redact(ref.url)}/ to {redact(aside)}/")
    older = [r for r in CheckpointStore(run_dir).complete() if r.step < ref.step]
    if older:
        return (f"move the damaged checkpoint aside ({move}) and rerun the same command: it resumes from "
                f"step {older[-1].step} ({redact(older[-1].url)}), the next older complete checkpoint")
    return (f"no older complete checkpoint is left: move the damaged one aside ({move}) and rerun to "
            "start the run over, or restore the file from a copy")


def load_init_weights(url: str, sha256: str | None, arch: str, map_location="cpu") -> dict:
    """A warm start's weights (train.init_from): the model file of the checkpoint at url, checked against
    meta.json and against `sha256` (what the launcher resolved), read with weights_only=True; its
    architecture must be the recipe's. Only the weights: no optimizer state, step or schedule."""
    meta = read_meta(url)
    fix = "point train.init_from at a checkpoint of this recipe's model.arch, or leave it unset to train from scratch"
    if sha256 and meta.get("model_sha256") != sha256:
        raise CloobError(f"train.init_from: {redact(url)} is not the checkpoint it was resolved to (model sha256 "
                         f"{str(meta.get('model_sha256'))[:12]}, expected {sha256[:12]})",
                         "rerun: the launcher resolves train.init_from again")
    if meta.get("arch") and meta["arch"] != arch:
        raise CloobError(f"train.init_from: {redact(url)} is a {meta['arch']} model, this recipe trains {arch}", fix)
    data = read_verified(url, MODEL_FILE, meta)
    try:
        return plain_data.load(data, map_location)
    except Exception as e:  # noqa: BLE001
        raise DamagedCheckpoint(url, MODEL_FILE, plain_data.why_not_loaded(e),
                                _HOSTILE if plain_data.refused_global(e) else None) from None
