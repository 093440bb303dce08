"""The open_clip architecture names, read from the model config files without importing open_clip.

Importing open_clip takes seconds (torchvision, torch._dynamo and timm come with it), so the
launcher checks a recipe's `model.arch` here before torchrun starts any rank: a typo fails in a
fraction of a second. The names are open_clip's own rule applied to the same folders: every JSON
file with embed_dim, vision_cfg and text_cfg in open_clip's model_configs/ and in ours.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
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
def known_architectures() -> tuple[str, ...]:
    names = set()
    for folder in (_open_clip_configs_dir(), MODEL_CONFIGS_DIR):
        for path in folder.glob("*.json"):
            try:
                cfg = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and all(k in cfg for k in _REQUIRED):
                names.add(path.stem)
    return tuple(sorted(names))


def check_architecture(arch: str) -> None:
    names = known_architectures()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run `cloob models` to list them"
        raise CloobError(f"unknown architecture {arch!r}", f"use an open_clip model name; {hint}")
