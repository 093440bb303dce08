"""Step checkpoints on any fsspec URL, written so that a crash never leaves a usable-looking half.

Layout of one checkpoint, `<run_dir>/checkpoints/step_00001000/`:
    open_clip_pytorch_model.bin   the model's state_dict only: open_clip.create_model_and_transforms(
                                  arch, pretrained=<this file>) loads it strictly
    open_clip_config.json         {"model_cfg", "preprocess_cfg"}: `local-dir:<folder>` loads it too
    train_state.pt                optimizer, grad scaler, step, epoch, RNG and data positions per rank
    meta.json                     written LAST: its presence marks the checkpoint complete; holds the
                                  step, the model file's sha256, the recipe hash, metrics
Every file is written atomically: to a temporary name and renamed on a local disk, one PUT on an
object store. Folders without meta.json are incomplete and ignored by resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tempfile
import uuid
from dataclasses import dataclass

import fsspec

from cloob.storage import atomic_write_bytes, is_local  # noqa: F401 (re-exported)

MODEL_FILE = "open_clip_pytorch_model.bin"
CONFIG_FILE = "open_clip_config.json"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"step_(\d{8})$")




def torch_bytes(obj) -> bytes:
    import torch  # here, not at the top: listing checkpoints (registry, evaluation) needs no torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CheckpointRef:
    url: str  # the checkpoint folder
    step: int

    @property
    def model_url(self) -> str:
        return posixpath.join(self.url, MODEL_FILE)

    def meta(self) -> dict:
        with fsspec.open(posixpath.join(self.url, META_FILE), "r") as f:
            return json.load(f)


class CheckpointStore:
    """The checkpoints of one run, under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str):
        self.root = posixpath.join(run_dir.rstrip("/"), "checkpoints")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)

    def _url(self, path: str) -> str:
        return path if is_local(self.fs) else self.fs.unstrip_protocol(path)

    def complete(self) -> list[CheckpointRef]:
        if not self.fs.exists(self._root_path):
            return []
        refs = []
        for p in self.fs.ls(self._root_path, detail=False):
            m = _STEP_DIR.search(p.rstrip("/"))
            if m and self.fs.exists(posixpath.join(p, META_FILE)):
                refs.append(CheckpointRef(self._url(p.rstrip("/")), int(m.group(1))))
        return sorted(refs, key=lambda r: r.step)

    def latest(self) -> CheckpointRef | None:
        refs = self.complete()
        return refs[-1] if refs else None

    def save(self, step: int, model_state: dict, model_cfg: dict, train_state: dict, meta: dict,
             keep: int) -> CheckpointRef:
        folder = posixpath.join(self.root, f"step_{step:08d}")
        model_bytes = torch_bytes(model_state)
        atomic_write_bytes(posixpath.join(folder, MODEL_FILE), model_bytes)
        atomic_write_bytes(posixpath.join(folder, CONFIG_FILE), json.dumps(model_cfg, indent=2).encode())
        atomic_write_bytes(posixpath.join(folder, STATE_FILE), torch_bytes(train_state))
        meta = {**meta, "step": step, "model_file": MODEL_FILE, "model_sha256": sha256_bytes(model_bytes),
                "model_bytes": len(model_bytes), "id": uuid.uuid4().hex}
        atomic_write_bytes(posixpath.join(folder, META_FILE), json.dumps(meta, indent=2).encode())
        self._prune(keep)
        return CheckpointRef(folder, step)

    def _prune(self, keep: int) -> None:
        for ref in self.complete()[:-keep]:
            _, path = fsspec.core.url_to_fs(ref.url)
            # meta.json first: a crash mid-delete leaves an incomplete folder, never a false complete one.
            self.fs.rm(posixpath.join(path, META_FILE))
            self.fs.rm(path, recursive=True)

    @staticmethod
    def load(ref: CheckpointRef, map_location="cpu") -> tuple[dict, dict, dict]:
        """(model state_dict, train state, meta), verifying the model file's sha256."""
        import torch

        meta = ref.meta()
        with fsspec.open(ref.model_url, "rb") as f:
            model_bytes = f.read()
        if sha256_bytes(model_bytes) != meta["model_sha256"]:
            raise ValueError(f"checkpoint {ref.url}: model file does not match its sha256 in meta.json")
        model_state = torch.load(io.BytesIO(model_bytes), map_location=map_location, weights_only=True)
        with fsspec.open(posixpath.join(ref.url, STATE_FILE), "rb") as f:
            train_state = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=False)
        return model_state, train_state, meta
