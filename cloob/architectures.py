"""The open_clip architecture names and configs, read from the model config files without importing
open_clip.

Importing open_clip takes seconds (torchvision, torch._dynamo and timm come with it), so the
launcher checks a recipe's `model.arch` here before torchrun starts any rank: a typo fails in a
fraction of a second. The names are open_clip's own rule applied to the same folders: every JSON
file with embed_dim, vision_cfg and text_cfg in open_clip's model_configs/ and in ours.

`skip_timm_unless_needed`: open_clip imports timm (a quarter of its 5 s import) for every
architecture, but only those with a timm image tower use it. A training rank, which knows its
architecture before it imports open_clip, leaves timm out when its tower is open_clip's own.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
from pathlib import Path

from cloob.errors import CloobError

MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"
_REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")


def _open_clip_configs_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise CloobError("open_clip is not installed", "install the project (uv sync) or open_clip_torch")
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


@functools.cache
def _configs() -> dict[str, dict]:
    configs = {}
    for folder in (_open_clip_configs_dir(), MODEL_CONFIGS_DIR):  # ours last: open_clip's order of adding
        for path in folder.glob("*.json"):
            try:
                cfg = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and all(k in cfg for k in _REQUIRED):
                configs[path.stem] = cfg
    return configs


def _natural(name: str) -> list:
    # open_clip's order of list_models(): "RN50" < "RN101", case-insensitive
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def known_architectures() -> tuple[str, ...]:
    """open_clip.list_models() with cloob's configs added, in the same order (`cloob models`)."""
    return tuple(sorted(_configs(), key=_natural))


def uses_timm(arch: str) -> bool:
    """Whether building `arch` needs timm (a timm image tower); True for a name not known here."""
    cfg = _configs().get(arch)
    return cfg is None or bool((cfg.get("vision_cfg") or {}).get("timm_model_name"))


def skip_timm_unless_needed(arch: str) -> bool:
    """Make timm unimportable in this process unless `arch` needs it or it is loaded already; open_clip
    then imports without it (its timm adapter is optional). Call before anything imports open_clip.
    Returns whether timm was left out."""
    import sys

    if "timm" in sys.modules or uses_timm(arch):
        return False
    sys.modules["timm"] = None  # `import timm` raises ImportError, which open_clip expects without timm
    return True


def skip_timm_for_args(argv: list[str]) -> None:
    """skip_timm_unless_needed for the run of `cloob.train ARGV` (recipe and overrides), before open_clip
    is imported: about 1.3 s of every rank's start. A recipe that does not load is left for the
    trainer to report."""
    from cloob.config import load_recipe

    args = [a for a in argv if not a.startswith("-")]
    try:
        arch = load_recipe(args[0], args[1:]).model.arch
    except Exception:  # noqa: BLE001 (reported by the trainer, with its message)
        return
    skip_timm_unless_needed(arch)


def check_architecture(arch: str) -> None:
    names = known_architectures()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run `cloob models` to list them"
        raise CloobError(f"unknown architecture {arch!r}", f"use an open_clip model name; {hint}")
