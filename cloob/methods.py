"""The training methods, the one list of them: the paper's 2x2 ablation grid (objective x retrieval).

A method is a name a recipe gives (`loss.method`), the objective and retrieval it trains with, and how
the results show it. Everything that knows methods reads METHODS: the recipe's validation
(cloob.config), the loss (cloob.losses), the results' order, labels and colours (cloob.results), the
studies (cloob.study). Adding a method is one entry here; a new objective or retrieval also needs its
loss function in cloob/losses/full.py and cloob/losses/rows.py (their OBJECTIVES / RETRIEVALS tables).
No torch here, so a recipe loads (and `cloob recipes`, `cloob deploy --dry-run`, a flow's skip check)
in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Objective = Literal["infonce", "infoloob"]
Retrieval = Literal["none", "hopfield"]


@dataclass(frozen=True)
class Method:
    name: str  # loss.method in a recipe, the results table's `method` column
    objective: str  # a key of cloob.losses.full.OBJECTIVES
    retrieval: str  # a key of cloob.losses.full.RETRIEVALS
    label: str  # in words: the paper's columns ("paper CLIP (...)")
    colormap: str  # the matplotlib colormap of its bars and curves (shades within it per checkpoint)
    paper_marker: tuple[str, str] | None = None  # (marker, colour) of its published numbers in figures


# In display order: results, figures and study reports list methods in this order (clip before cloob:
# each CLOOB column lands right after the CLIP column it is compared with).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("clip", "infonce", "none", "CLIP", "Blues", paper_marker=("D", "tab:blue")),
    Method("cloob", "infoloob", "hopfield", "CLOOB", "Oranges", paper_marker=("*", "tab:orange")),
    Method("infoloob", "infoloob", "none", "INFOLOOB", "Greens"),
    Method("clip_hopfield", "infonce", "hopfield", "CLIP_HOPFIELD", "Purples"),
)}


def get(name: str) -> Method:
    """The method called `name`, else ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(METHODS)}")
    return METHODS[name]


def order(name: str | None) -> int:
    """A method's place in the display order; unknown methods (and none) after every known one."""
    return list(METHODS).index(name) if name in METHODS else len(METHODS)
