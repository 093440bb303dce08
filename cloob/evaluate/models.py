"""Load a model for evaluation, with what the results table needs to know about it.

A model reference is one of:
    <checkpoint folder>       one of our step checkpoints (holds meta.json), any fsspec URL
    <run folder>              one of our runs: its latest complete checkpoint
    <ARCH>=<weights file>     any open_clip architecture with a local or fsspec weights file:
                              an open_clip/OpenCLIP state dict (.pt/.bin/.safetensors) or an OpenAI
                              TorchScript archive (RN50.pt), e.g. RN50=~/weights/RN50.pt
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cloob import plain_data
from cloob.errors import CloobError
from cloob.registry.lineage import pretraining_data, resolve_checkpoint
from cloob.storage import Location, redact


@dataclass
class EvalModel:
    model: torch.nn.Module
    preprocess: object  # the model's validation transform (PIL image -> tensor)
    tokenizer: object
    info: dict = field(default_factory=dict)  # lineage columns of the results table


def load_checkpoint(ref: str, device: str | torch.device = "cpu") -> EvalModel:
    """One of our checkpoints (folder or run), verified against the sha256 in its meta.json."""
    import open_clip

    from cloob.model import MODEL_CONFIGS_DIR, check_architecture
    from cloob.train.checkpoint import CONFIG_FILE, MODEL_FILE, read_meta, read_verified, sha256_bytes, verify_files

    url = resolve_checkpoint(ref)
    meta = read_meta(url)
    if "arch" not in meta or "model_sha256" not in meta:
        raise CloobError(f"checkpoint {redact(url)}: meta.json has no arch or model_sha256",
                         "point at a checkpoint written by `cloob train`")
    arch = meta["arch"]
    check_architecture(arch)
    # The model file is read and hashed; the others evaluation does not read are checked by size
    # (train_state.pt is twice the model: hashing it for every evaluation would double the reads).
    blob = read_verified(url, MODEL_FILE, meta)
    verify_files(url, meta, hashed={CONFIG_FILE})
    sha = sha256_bytes(blob)
    if sha != meta["model_sha256"]:  # the checkpoint's id, checked even where `files` disagrees with it
        raise CloobError(f"checkpoint file {redact(posixpath.join(url, MODEL_FILE))} does not match the "
                         "sha256 in meta.json", "the file is damaged or was replaced; use another checkpoint "
                         "or re-run training")
    open_clip.add_model_config(MODEL_CONFIGS_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    try:
        state = plain_data.load(blob)
    except Exception as e:  # noqa: BLE001 -- garbage bytes fail with any of many errors
        what = "a weights file" if plain_data.refused_global(e) else "a readable weights file"
        raise CloobError(f"{redact(posixpath.join(url, MODEL_FILE))} is not {what}: "
                         f"{plain_data.why_not_loaded(e).removeprefix('is ')}",
                         "use a checkpoint written by `cloob train` (its model file holds only tensors), and "
                         "evaluate only checkpoints from a source you trust") from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise CloobError(f"cannot load checkpoint {redact(url)} as {arch}: {type(e).__name__}: "
                         f"{plain_data.text_of(e)}",
                         "the weights do not fit the architecture in meta.json; use a checkpoint written "
                         "by this version of `cloob train`") from None
    run_dir = posixpath.dirname(posixpath.dirname(url))
    # An imported checkpoint (cloob import: meta.json has `source`) has no run folder and no step.
    data, data_hash = (meta.get("pretraining_data"), None) if meta.get("source") else pretraining_data(run_dir)
    step = None if meta.get("step") is None and meta.get("source") else int(meta["step"])
    info = {"run_id": meta.get("run_name") or posixpath.basename(run_dir), "checkpoint_id": sha,
            "checkpoint_uri": redact(url), "step": step, "method": meta.get("method"),
            "arch": arch, "pretraining_data": data, "pretraining_hash": data_hash,
            "samples_seen": meta.get("samples_seen")}
    return EvalModel(model.to(device).eval(), preprocess, open_clip.get_tokenizer(arch), info)


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _pretrained_tag(arch: str, filename: str) -> str | None:
    """open_clip's pretrained tag whose download has this file name (RN50 + RN50.pt -> openai)."""
    import open_clip

    for tag in open_clip.list_pretrained_tags_by_model(arch):
        cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        url = cfg.get("url") or ""
        if url and posixpath.basename(url.split("?")[0]) == filename:
            return tag
    return None


def _local_copy(url: str) -> tuple[str, bool]:
    """(a local path of the file at url, whether it is a temporary download the caller deletes).
    open_clip and torch.jit read only local files."""
    loc = Location(url)
    if loc.is_local:
        return loc.root, False
    fd, tmp = tempfile.mkstemp(suffix="-" + posixpath.basename(loc.root))
    os.close(fd)
    try:
        loc.fs.get_file(loc.root, tmp)
    except BaseException:
        os.unlink(tmp)  # a failed download (a missing file, an outage) leaves nothing behind
        raise
    return tmp, True


def load_open_clip_weights(arch: str, weights: str, device: str | torch.device = "cpu",
                           pretraining: str | None = None, method: str = "clip") -> EvalModel:
    """An open_clip architecture with weights from a file (state dict, safetensors or OpenAI JIT)."""
    import open_clip

    from cloob.model import MODEL_CONFIGS_DIR, check_architecture

    open_clip.add_model_config(MODEL_CONFIGS_DIR)
    check_architecture(arch)
    weights = os.path.expanduser(weights)
    try:
        local, temporary = _local_copy(weights)
    except FileNotFoundError:
        raise CloobError(f"weights file {redact(weights)} does not exist",
                         f"give the path of a downloaded weights file: {arch}=/path/to/weights.pt") from None
    try:
        if not os.path.isfile(local):
            raise CloobError(f"weights file {redact(weights)} does not exist",
                             f"give the path of a downloaded weights file: {arch}=/path/to/weights.pt")
        h = hashlib.sha256()
        with open(local, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        try:
            if _is_torchscript(local):
                # OpenAI's original release (RN50.pt, ViT-B-32.pt): a TorchScript archive whose state
                # dict has open_clip's key names. Every OpenAI model uses QuickGELU.
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                    state = torch.jit.load(local, map_location="cpu").state_dict()
                # Not weights: OpenAI's extra attributes and the (recomputed) causal attention mask.
                for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
                    state.pop(key, None)
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None,
                                                                             force_quick_gelu=True)
                model.load_state_dict(state, strict=True)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=local)
        except (RuntimeError, KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile,
                __import__("pickle").UnpicklingError) as e:
            raise CloobError(f"cannot load {redact(weights)} as {arch} weights: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}",
                             "check that the file belongs to this architecture (`cloob models` lists them) "
                             "and is not truncated") from None
    finally:
        if temporary:
            os.unlink(local)
    name = Path(weights).name
    tag = _pretrained_tag(arch, name)
    info = {"run_id": f"open_clip:{arch}:{name}", "checkpoint_id": h.hexdigest(),
            "checkpoint_uri": redact(weights), "step": None, "method": method, "arch": arch,
            "pretraining_data": pretraining or tag, "pretraining_hash": None, "samples_seen": None}
    return EvalModel(model.to(device).eval(), preprocess, open_clip.get_tokenizer(arch), info)


def parse_external(ref: str) -> tuple[str, str] | None:
    """ARCH=PATH -> (arch, path); None for a plain checkpoint/run reference."""
    if "=" not in ref:
        return None
    arch, path = ref.split("=", 1)
    if "/" in arch or not arch:
        return None
    return arch, path


def load_model(ref: str, device: str | torch.device = "cpu", pretraining: str | None = None) -> EvalModel:
    ext = parse_external(ref)
    if ext:
        return load_open_clip_weights(*ext, device=device, pretraining=pretraining)
    return load_checkpoint(ref, device=device)
