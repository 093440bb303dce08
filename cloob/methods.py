"""The paper's 2x2 ablation grid as data: method name -> (objective, retrieval). No torch here, so a
recipe loads (and `cloob recipes`, `cloob deploy --dry-run`, a flow's skip check) in milliseconds;
cloob.losses computes them."""

from __future__ import annotations

from typing import Literal

Objective = Literal["infonce", "infoloob"]
Retrieval = Literal["none", "hopfield"]

METHODS: dict[str, tuple[Objective, Retrieval]] = {
    "clip": ("infonce", "none"),
    "cloob": ("infoloob", "hopfield"),
    "infoloob": ("infoloob", "none"),
    "clip_hopfield": ("infonce", "hopfield"),
}
