"""A study's cells: one ordinary training run per method x architecture x swept point x seed, with
the recipe overrides that make it, and the checkpoint steps at which it is evaluated.

A cell's run is named and hashed like any other run (`<recipe>-<method>-...-<hash>`), so a study
rerun finds, skips or resumes its runs exactly as `cloob train` and the pipeline do.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from cloob.study.spec import StudySpec

# A study evaluates earlier checkpoints, so its runs keep them all (the default keeps the last few).
KEEP_ALL = 1_000_000


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int
    arch: str | None = None
    point: tuple[tuple[str, Any], ...] = ()  # the swept settings, (field, value) pairs
    overrides: tuple[str, ...] = field(default=(), compare=False)

    @property
    def group(self) -> tuple:
        """What the seeds are repeats of: method, architecture and swept point."""
        return (self.method, self.arch, self.point)

    @property
    def label(self) -> str:
        return group_label(self.group)


def group_label(group: tuple) -> str:
    """`cloob RN50 beta=8`: a group's method, architecture and swept settings, as reports show them."""
    method, arch, point = group
    return " ".join([method, *([arch] if arch else []), *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point)])


def checkpoint_every(spec: StudySpec) -> int | None:
    """The checkpoint cadence that lands on every step to evaluate (their greatest common divisor);
    None: only the last step is evaluated, the recipe's cadence stays."""
    wanted = [*([spec.evaluate.every] if spec.evaluate.every else []), *spec.evaluate.steps]
    return math.gcd(*wanted) if wanted else None


def cells(spec: StudySpec) -> list[Cell]:
    """Every cell, grouped by method, architecture and swept point, seeds innermost."""
    cadence = checkpoint_every(spec)
    out = []
    for method, arch, point, seed in ((m, a, p, s) for m in spec.methods for a in spec.archs or [None]
                                      for p in sweep_points(spec.sweep_of(m)) for s in spec.seed_list):
        ov = [*spec.overrides, *spec.method_overrides.get(method, []), f"loss.method={method}",
              *([f"model.arch={arch}"] if arch else []), *(f"{k}={v}" for k, v in point), f"train.seed={seed}"]
        if cadence:
            ov += [f"train.checkpoint_every={cadence}", f"train.keep_checkpoints={KEEP_ALL}"]
        out.append(Cell(method, seed, arch, point, tuple(ov)))
    return out


def check_cells(spec: StudySpec) -> list[Cell]:
    """Every cell, each one's recipe loaded with its overrides first: a misspelt or out-of-range swept
    field is one error naming the cell now, not a failure when that cell's turn comes, hours into a
    study on a cluster."""
    from cloob.config import load_recipe
    from cloob.errors import CloobError

    out = cells(spec)
    for cell in out:
        try:
            # data.* never changes a run's content; a placeholder lets the recipe validate without it.
            load_recipe(spec.recipe, ["data.train=<the study's data>", *cell.overrides])
        except CloobError as e:
            raise CloobError(f"study {spec.name}, cell {cell.label} seed {cell.seed}: {e.problem}",
                             "correct the study's overrides, method_overrides, sweep or method_sweep "
                             f"(the cell's overrides: {' '.join(cell.overrides)})") from None
    return out


def method_settings(cells: list[Cell]) -> dict[str, list[str]]:
    """Each method's own recipe overrides (a study's method_overrides, as its cells carry them): those
    every cell of the method has and some other method's cells do not, the method itself left out."""
    by_method: dict[str, set[str]] = {}
    for c in cells:
        own = {o for o in c.overrides if not o.startswith("loss.method=")}
        by_method[c.method] = by_method[c.method] & own if c.method in by_method else own
    everyone = set.intersection(*by_method.values()) if by_method else set()
    order = {o: i for c in cells for i, o in enumerate(c.overrides)}
    return {m: sorted(own - everyone, key=order.get) for m, own in by_method.items() if own - everyone}


def sweep_points(sweep: dict[str, list[Any]]) -> list[tuple[tuple[str, Any], ...]]:
    """Every combination of a sweep's values, as (field, value) pairs; one empty point for no sweep."""
    keys = list(sweep)
    return [tuple(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def steps_to_evaluate(spec: StudySpec, available: list[int]) -> list[int]:
    """Of a finished run's checkpoint steps, those the study evaluates: multiples of evaluate.every,
    the listed steps, and always the last."""
    if not available:
        return []
    every, listed = spec.evaluate.every, set(spec.evaluate.steps)
    keep = {s for s in available if (every and s % every == 0) or s in listed}
    return sorted(keep | {max(available)})
