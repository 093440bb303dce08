"""`cloob import ml-jku-cloob FILE`: the paper's own checkpoints as one of our checkpoint folders.

ml-jku/cloob, the paper's code (a 2021 fork of OpenCLIP), published RN50 and RN50x4 models trained on
YFCC15M: cloob_rn50_yfcc_epoch_28.pt and cloob_rn50x4_yfcc_epoch_28.pt under
https://ml.jku.at/research/CLOOB/downloads/checkpoints/. What such a file holds, as read from that
repository's src/training/main.py, src/clip/model.py and src/notebooks/zeroshot.ipynb:

    epoch, name, state_dict, optimizer, scheduler   what its main.py saves; the optimizer state makes
                                                     the file about three times the model
    model_config_file                                the model config's name (RN50.json), which the
                                                     notebook reads; a string or a path object
    method                                           at its first commit only ("cloob" or "clip")

The state dict is DistributedDataParallel's ("module." before every key), saved from the GPUs (read
here onto the CPU), of its CLIPGeneral model:

    visual.*                        its ModifiedResNet: open_clip's names and computation
    transformer.transformer.*       the text transformer's blocks       open_clip: transformer.*
    transformer.token_embedding.*, transformer.positional_embedding,
    transformer.ln_final.*, transformer.text_projection                 open_clip: the same, at the top
    logit_inv_tau                   log(inv_tau)                        open_clip: logit_scale
    logit_scale_hopfield            first commit only: the Hopfield beta, a setting of the loss and not
                                    of the model: dropped (its value is kept in meta.json's `source`)

Its text transformer uses QuickGELU, so the open_clip architecture is <encoder>-quickgelu
(RN50-quickgelu, RN50x4-quickgelu), into which the converted weights load strictly.

The file is read with torch.load(weights_only=True), which builds tensors, numbers, strings, lists and
dicts and nothing else; path objects (model_config_file) are allowed besides. A file that would need
anything more is refused before any of it runs, as one CloobError naming what it asked for.

The result is an ordinary checkpoint folder (cloob.train.checkpoint's files, without train_state.pt:
open_clip_pytorch_model.bin, open_clip_config.json, meta.json written last) whose meta.json records
the architecture, the method, the pretraining data (yfcc15m, as the paper's) and, under `source`,
the file's name, size and sha256. It is registered with an alias named after it, so that `cloob
evaluate <name>` and `cloob results` treat it as they treat a run of ours, with the paper's numbers for
its setting beside it. Every check comes before the first write.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import posixpath
import re
import time
import uuid
import zipfile
from dataclasses import dataclass

import torch

from cloob.errors import CloobError
from cloob.storage import Location, redact

SOURCE = "ml-jku-cloob"
DOWNLOADS = "https://ml.jku.at/research/CLOOB/downloads/checkpoints/"
# The image towers of ml-jku/cloob's model configs that open_clip has: recognised by their shapes.
ENCODERS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")
DROPPED = ("logit_scale_hopfield",)
INFO_KEYS = ("epoch", "name", "model_config_file", "method")
# Besides plain data, the one kind of object such a file holds: model_config_file as a path. The name
# each is pickled under is given too, so that a file written on another Python still matches.
_PATHS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
SAFE_GLOBALS = [*_PATHS, *[(cls, f"pathlib.{cls.__name__}") for cls in _PATHS]]
_TEXT_TOP = ("token_embedding.", "positional_embedding", "ln_final.", "text_projection")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_FIX_FILE = f"give the .pt file as published: download it again from {DOWNLOADS}"


@dataclass
class Imported:
    checkpoint: str  # the checkpoint folder written (or found)
    meta: dict
    new: bool  # False: the folder held this import already, nothing was written
    entry: dict | None = None  # the registry entry
    registered: bool = False  # False: the registry knew the checkpoint already
    moved: tuple[str, ...] = ()  # the aliases that moved to it


# ------------------------------------------------------------------------------------- reading

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0][:200] if text else ""


def _check_container(path: str, shown: str) -> bool:
    """Whether the PyTorch file is a zip archive holding data.pkl (torch >= 1.6); else it is a pickle
    (older torch). A CloobError for neither."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CloobError(f"{shown} is a damaged zip archive ({_first_line(e)})", _FIX_FILE) from None
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise CloobError(f"{shown} is a TorchScript archive, not a checkpoint of ml-jku/cloob's training",
                             "for OpenAI's TorchScript releases use `cloob evaluate RN50=<file>`; here "
                             f"{_FIX_FILE}")
        if not any(posixpath.basename(n) == "data.pkl" for n in names):
            raise CloobError(f"{shown} is a zip archive but not a PyTorch checkpoint (no data.pkl in it)", _FIX_FILE)
        return True
    if not head.startswith(b"\x80"):  # every pickle since protocol 2 starts with PROTO
        raise CloobError(f"{shown} is not a PyTorch checkpoint (neither a zip archive nor a pickle)", _FIX_FILE)
    return False


def load_safely(path: str, shown: str | None = None):
    """torch.load(weights_only=True) of a local file, onto the CPU; a CloobError for anything that is
    not plain data (nothing of it runs) or not a PyTorch file."""
    shown = shown or path
    zipped = _check_container(path, shown)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            # mmap: the tensors stay in the file until used, so the optimizer state (twice the model)
            # is never read into memory
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        wanted = re.search(r"GLOBAL (\S+?)(?: was not|\s|$)", text)
        if wanted:
            raise CloobError(f"refused {shown}: loading it would call {wanted.group(1)}, which is not plain data "
                             "(tensors, numbers, strings, paths); it was not loaded and nothing of it ran",
                             "a checkpoint of ml-jku/cloob holds only plain data: check where this file came "
                             f"from, and {_FIX_FILE}") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise CloobError(f"refused {shown}: it does not load as plain data "
                         f"({(reason.group(1) if reason else _first_line(e)).strip()[:200]}); nothing of it ran",
                         _FIX_FILE) from None
    except Exception as e:  # noqa: BLE001 -- a file that is not a checkpoint fails with any of many errors
        raise CloobError(f"{shown} cannot be read as a PyTorch checkpoint: {type(e).__name__}: {_first_line(e)}",
                         _FIX_FILE) from None


def state_dict_and_info(obj, shown: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(the state dict, {epoch, name, model_config_file, method} as far as present) of a loaded file:
    the training script's dict, or a bare state dict."""
    if isinstance(obj, dict) and "state_dict" in obj:
        sd, info = obj["state_dict"], {k: obj[k] for k in INFO_KEYS if k in obj}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, info = obj, {}
    else:
        what = type(obj).__name__
        if isinstance(obj, dict):
            what += f" with the keys {', '.join(sorted(map(str, obj))[:8]) or 'none'}"
        raise CloobError(f"{shown} holds a {what}: neither ml-jku/cloob's checkpoint (a dict with state_dict, "
                         "epoch, name, optimizer, ...) nor a state dict", _FIX_FILE)
    if not (isinstance(sd, dict) and sd and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in sd.items())):
        raise CloobError(f"{shown}: its state_dict is not a mapping of parameter names to tensors", _FIX_FILE)
    if isinstance(info.get("model_config_file"), pathlib.PurePath | str):
        info["model_config_file"] = pathlib.PurePath(str(info["model_config_file"]).replace("\\", "/")).name
    else:
        info.pop("model_config_file", None)
    for key, kind in (("epoch", int), ("name", str), ("method", str)):
        if key in info and not isinstance(info[key], kind):
            info.pop(key)  # not what ml-jku/cloob writes there: not provenance worth keeping
    return sd, info


# ---------------------------------------------------------------------------------- converting

def rename_keys(sd: dict[str, torch.Tensor], shown: str = "the file") -> tuple[dict[str, torch.Tensor], dict]:
    """ml-jku/cloob's key names -> open_clip's (the tensors untouched), and {dropped key: its value}."""
    prefixed = {k.startswith("module.") for k in sd}
    if len(prefixed) > 1:
        raise CloobError(f"{shown}: some keys of its state_dict start with 'module.' and some do not", _FIX_FILE)
    out: dict[str, torch.Tensor] = {}
    dropped: dict = {}
    for key, t in sd.items():
        k = key.removeprefix("module.")
        if k in DROPPED:
            dropped[k] = float(t.float().reshape(-1)[0]) if t.numel() == 1 and t.device.type != "meta" else None
            continue
        if k == "logit_inv_tau":
            k = "logit_scale"
        elif k.startswith("transformer.transformer.") or k.removeprefix("transformer.").startswith(_TEXT_TOP):
            k = k.removeprefix("transformer.")  # the text tower's nesting (CLIPGeneral); flat names stay
        if k in out:
            raise CloobError(f"{shown}: two of its keys both mean {k!r}", _FIX_FILE)
        out[k] = t
    return out, dropped


def infer_encoder(sd: dict[str, torch.Tensor]) -> str | None:
    """The image tower (RN50, RN50x4, ...) whose open_clip config the open_clip-named weights' shapes
    fit, or None."""
    import open_clip

    try:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        layers = [len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")}) for i in (1, 2, 3, 4)]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        seen = (layers, width, grid * 32, sd["text_projection"].shape[1], sd["ln_final.weight"].shape[0],
                len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}))
    except (KeyError, IndexError, AttributeError):
        return None
    for enc in ENCODERS:
        cfg = open_clip.get_model_config(f"{enc}-quickgelu") or {}
        v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if seen == (list(v.get("layers", [])), v.get("width"), v.get("image_size"), cfg.get("embed_dim"),
                    t.get("width"), t.get("layers")):
            return enc
    return None


def choose_arch(requested: str | None, info: dict, sd: dict[str, torch.Tensor], shown: str) -> str:
    """The open_clip architecture: --arch, else the file's model_config_file, else the one whose shapes
    fit; always the QuickGELU variant (the reference's text transformer uses QuickGELU)."""
    from cloob.architectures import check_architecture

    def encoder(name: str) -> str:
        return re.sub(r"(-quickgelu)?(\.json)?$", "", name, flags=re.IGNORECASE)

    named = encoder(info["model_config_file"]) if info.get("model_config_file") else None
    if requested and named and encoder(requested).lower() != named.lower():
        raise CloobError(f"--arch {requested}, but {shown} says it is {named} (model_config_file "
                         f"{info['model_config_file']})", f"leave --arch out, or give --arch {named}")
    enc = encoder(requested) if requested else named or infer_encoder(sd)
    if enc is None:
        raise CloobError(f"cannot tell the architecture of {shown}: it names no model config and its shapes "
                         f"fit none of {', '.join(ENCODERS)}", "give it: --arch RN50 or --arch RN50x4")
    arch = f"{enc}-quickgelu"
    try:
        check_architecture(arch)
    except CloobError as e:
        raise CloobError(f"open_clip has no {arch} (ml-jku/cloob's models use QuickGELU): {e.problem}",
                         f"give the encoder's name, e.g. --arch RN50 or --arch RN50x4; {e.fix}") from None
    return arch


def fit_strictly(arch: str, sd: dict[str, torch.Tensor], shown: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights in open_clip's key order, once open_clip's `arch` has loaded them strictly (built
    on the meta device: no memory, no time), and its preprocess config. One CloobError listing what
    does not fit."""
    import open_clip

    import cloob.model  # noqa: F401 (quiets open_clip's "No pretrained weights loaded" for pretrained=None)

    with torch.device("meta"):  # the initialisation, too: only the shapes are wanted
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} where {arch} has {tuple(want[k].shape)}"
              for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

        parts = [f"{len(missing)} missing ({some(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
                 f"{len(shapes)} of another shape ({some(shapes)})" if shapes else ""]
        fits = infer_encoder(sd)
        hint = (f"its shapes fit {fits}: give --arch {fits}" if fits and f"{fits}-quickgelu" != arch
                else "give the ml-jku/cloob RN50 or RN50x4 checkpoint itself (its keys are visual.*, "
                     "transformer.*, logit_inv_tau), with --arch RN50 or --arch RN50x4")
        raise CloobError(f"the weights of {shown} do not fit {arch}: keys {'; '.join(p for p in parts if p)}", hint)
    ordered = {k: sd[k] for k in want}
    model.load_state_dict(ordered, strict=True, assign=True)
    preprocess = {k: list(v) if isinstance(v, tuple) else v
                  for k, v in (getattr(model.visual, "preprocess_cfg", {}) or {}).items()}
    return ordered, preprocess


def convert(obj, shown: str, arch: str | None = None) -> tuple[str, dict[str, torch.Tensor], dict, dict]:
    """(arch, open_clip state dict on the CPU in float32, preprocess config, facts of the source: its
    info, dropped keys, dtypes) of a loaded ml-jku/cloob checkpoint."""
    sd, info = state_dict_and_info(obj, shown)
    renamed, dropped = rename_keys(sd, shown)
    arch = choose_arch(arch, info, renamed, shown)
    ordered, preprocess = fit_strictly(arch, renamed, shown)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in ordered.values() if t.is_floating_point()})
    weights = {k: (t.float() if t.is_floating_point() else t).detach().to("cpu").contiguous()
               for k, t in ordered.items()}
    facts = {**info, "dtypes": dtypes, "dropped": dropped,
             "inv_tau": float(weights["logit_scale"].exp()) if "logit_scale" in weights else None}
    return arch, weights, preprocess, facts


# ------------------------------------------------------------------------------------ importing

def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name) or re.fullmatch(r"[0-9a-f]{6,64}", name):
        raise CloobError(f"{what} {name!r} is not a valid name",
                         "use letters, digits, '.', '_' and '-', starting with a letter or digit (it names "
                         "the checkpoint folder, the run in the results table and a registry alias)")


def _existing(out: str, meta: dict) -> dict | None:
    """The meta.json of the same import already at `out`, None if `out` is free to write; a CloobError
    if it holds something else."""
    from cloob.train.checkpoint import CONFIG_FILE, META_FILE, MODEL_FILE, read_meta, verify_files

    loc = Location(out)
    if loc.isfile():
        raise CloobError(f"{redact(out)} is a file", "give --out a folder (it is created)")
    if loc.exists(META_FILE):
        old = read_meta(out)
        if all(old.get(k) == meta.get(k) for k in ("model_sha256", "arch", "method", "pretraining_data", "run_name")):
            verify_files(out, old)  # every file, hashed: "already imported" vouches for the folder
            return old
        raise CloobError(f"{redact(out)} holds another checkpoint ({old.get('run_name')}, "
                         f"{(old.get('source') or {}).get('file') or 'not an import'}, method {old.get('method')}, "
                         f"pretraining {old.get('pretraining_data')})",
                         "import under another --name (or --out), or move that folder away first")
    leftovers = [n for n in loc.list(hidden=True) if n not in (MODEL_FILE, CONFIG_FILE) and not n.startswith(".tmp-")] \
        if loc.isdir() else []
    if leftovers:
        raise CloobError(f"{redact(out)} is not empty ({', '.join(leftovers[:4])})",
                         "give --out a new folder, or another --name")
    return None  # missing, or what a killed import left (no meta.json): written again whole


def import_reference(source: str, *, store: str = ".", out: str | None = None, registry: str | None = None,
                     arch: str | None = None, name: str | None = None, aliases: list[str] | tuple[str, ...] = (),
                     pretraining: str = "yfcc15m", method: str | None = None, register: bool = True) -> Imported:
    """Convert an ml-jku/cloob checkpoint file (local path or fsspec URL) into a checkpoint folder
    (default <store>/imports/<name>) and register it in <store>/registry (or `registry`) with the alias
    <name>, plus `aliases`. Idempotent: the same file imported again writes nothing."""
    from cloob.evaluate.models import _local_copy
    from cloob.methods import METHODS
    from cloob.registry.store import Registry
    from cloob.train.checkpoint import CONFIG_FILE, META_FILE, MODEL_FILE, file_digest, torch_bytes
    from cloob.version import code_version

    if method is not None and method not in METHODS:
        raise CloobError(f"--method {method!r} is not one of {', '.join(METHODS)}", "leave it out: cloob")
    _check_name(pretraining, "--pretraining")
    for a in aliases:
        _check_name(a, "--alias")
    if name is not None:
        _check_name(name, "--name")
    path = os.path.expanduser(source)
    shown = redact(source.split("?", 1)[0])
    file_name = posixpath.basename(shown.rstrip("/")) or shown
    try:
        local, temporary = _local_copy(path)
    except (FileNotFoundError, IsADirectoryError):
        raise CloobError(f"{shown} does not exist",
                         f"give the downloaded file, e.g. cloob_rn50_yfcc_epoch_28.pt from {DOWNLOADS}") from None
    except (OSError, ValueError, ImportError) as e:
        raise CloobError(f"cannot read {shown}: {type(e).__name__}: {_first_line(e)}",
                         "check the path or URL, network and credentials") from None
    try:
        if not os.path.isfile(local):
            raise CloobError(f"{shown} is a folder, not a file" if os.path.isdir(local) else f"{shown} does not exist",
                             f"give the checkpoint file itself, e.g. cloob_rn50_yfcc_epoch_28.pt from {DOWNLOADS}")
        size, sha = os.path.getsize(local), _sha256(local)
        obj = load_safely(local, shown)
    finally:
        if temporary:
            os.unlink(local)
    arch, weights, preprocess, facts = convert(obj, shown, arch)
    del obj  # the optimizer state: twice the model
    if method is None:
        method = facts.get("method") if facts.get("method") in METHODS else "cloob"
    elif facts.get("method") and facts["method"] != method:
        raise CloobError(f"--method {method}, but {shown} says it was trained with {facts['method']}",
                         f"leave --method out, or give --method {facts['method']}")
    encoder = arch.removesuffix("-quickgelu")
    name = name or f"ml-jku-{method}-{encoder.lower()}-{pretraining}"
    _check_name(name, "--name")
    out = (out or posixpath.join(store, "imports", name)).rstrip("/")

    model_bytes = torch_bytes(weights)
    model_digest = file_digest(model_bytes)
    config_bytes = json.dumps({"model_cfg": _model_cfg(arch), "preprocess_cfg": preprocess}, indent=2).encode()
    src = {"kind": SOURCE, "repository": "https://github.com/ml-jku/cloob", "file": file_name,
           "sha256": sha, "bytes": size, **{k: facts[k] for k in INFO_KEYS if k in facts},
           "dtypes": facts["dtypes"], "dropped": facts["dropped"], "inv_tau": facts["inv_tau"]}
    meta = {"arch": arch, "method": method, "pretraining_data": pretraining, "run_name": name,
            "step": None, "epoch": facts.get("epoch"), "samples_seen": None, "source": src,
            "code_version": code_version(), "metrics": {}, "time": time.time(),
            "model_file": MODEL_FILE, "model_sha256": model_digest["sha256"], "model_bytes": model_digest["bytes"],
            "files": {MODEL_FILE: model_digest, CONFIG_FILE: file_digest(config_bytes)}, "id": uuid.uuid4().hex}
    old = _existing(out, meta)
    if old is None:
        loc = Location(out)
        loc.write_bytes(MODEL_FILE, model_bytes)
        loc.write_bytes(CONFIG_FILE, config_bytes)
        loc.write_json(META_FILE, meta, indent=2)  # last: its presence marks the checkpoint complete
    result = Imported(out, old or meta, new=old is None)
    if register:
        reg = Registry(registry or posixpath.join(store, "registry"))
        r = reg.add(out, aliases=[name, *aliases], note=f"imported from ml-jku/cloob: {file_name} (sha256 {sha})")
        result.entry, result.registered, result.moved = r.entry, r.new, tuple(r.moved)
    return result


def _model_cfg(arch: str) -> dict:
    import open_clip

    return open_clip.get_model_config(arch)
