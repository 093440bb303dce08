"""What img2dataset's processes need not import: a fetch process, its spawned pool workers and logger,
and the Spark executors and Ray workers that rebuild cloob's downloader.

img2dataset imports, in every such process, modules that a download never uses here:
- torch, through webdataset (under its writer), when it can: ~3 s of CPU and ~300 MB;
- wandb, in its logger module, used only with `enable_wandb` (cloob.prepare.run passes False): ~0.8 s;
- ray, in its distributor module, used only by its Ray distributor: ~0.6 s;
- albumentations, in its resizer and blurrer, used only when a picture is resized: ~1.2 s, which the
  fetch process and img2dataset's logger never do.

A preparation starts at least three such processes (the fetch process, the logger, a pool worker per
`download.processes`, replaced after five shards), so these seconds add up to most of a small
preparation's CPU. Each is cut here before img2dataset is imported: torch and ray are made
unimportable (img2dataset and webdataset then take their fallbacks), wandb and albumentations are
imported on their first use instead (a stand-in module forwards to the real one).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

DEFERRED = ("wandb", "albumentations")


def make_lean(*, keep_ray: bool = False) -> None:
    """Call before importing img2dataset, only in a process that runs nothing but a download: torch
    (and ray, unless `keep_ray`) stop being importable in it."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import
    sys.modules.setdefault("torch", None)
    if not keep_ray:
        sys.modules.setdefault("ray", None)
    for name in DEFERRED:
        defer(name)


def defer(name: str) -> None:
    """Make `import name` cheap until an attribute of the module is used: the first use imports the
    real module, which then takes the stand-in's place in sys.modules."""
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return

    class Deferred(types.ModuleType):
        def __getattr__(self, attr: str):
            if sys.modules.get(name) is self:
                del sys.modules[name]
            return getattr(importlib.import_module(name), attr)

    sys.modules[name] = Deferred(name)
