"""A study spec: which pretraining data and recipe, which methods, seeds, architectures and swept
settings, which downstream sets, and at which steps to evaluate. Validated like recipes and data
specs: an unknown field, a method that does not exist or an empty grid is one CloobError.

    name: demo
    data: demo                      # a data spec (data_specs/<name>.yaml or a path)
    recipe: tiny                    # a recipe (cloob/recipes/<name>.yaml or a path)
    overrides: [train.steps=300]    # for every cell
    method_overrides: {cloob: [model.inv_tau=30, loss.beta=25]}   # each method's own settings
    methods: [cloob, clip]
    seeds: 3                        # 0, 1, 2; or a list [0, 7, 11]
    sweep: {loss.beta: [8, 14.3]}   # optional: every combination is a cell of its own
    method_sweep: {clip: {model.inv_tau: [20, 50]}}   # optional: one method's own swept settings
    downstream: [shapes, colors]
    evaluate: {every: 100}          # every 100 steps, and the last; or {steps: [50, 300]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cloob.errors import CloobError
from cloob.methods import METHODS
from cloob.names import check_name, pydantic_name

STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvaluateAt(_Section):
    every: int | None = Field(None, ge=1, description="evaluate every k steps (and the last)")
    steps: list[int] = Field(default_factory=list, description="evaluate at these steps too (and the last)")

    @field_validator("steps")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(s < 1 for s in v):
            raise ValueError("steps must be at least 1")
        return sorted(set(v))


class StudySpec(_Section):
    name: Annotated[str, AfterValidator(pydantic_name)]
    description: str = ""
    data: str = Field(description="pretraining data spec: a name in data_specs/ or a path")
    data_overrides: list[str] = Field(default_factory=list, description="overrides of the data spec")
    recipe: str = Field(description="training recipe: a name in cloob/recipes/ or a path")
    overrides: list[str] = Field(default_factory=list, description="recipe overrides for every cell")
    method_overrides: dict[str, list[str]] = Field(default_factory=dict,
                                                   description="recipe overrides of one method's cells")
    methods: list[str] = Field(default_factory=lambda: ["cloob", "clip"], min_length=1)
    seeds: int | list[int] = Field(5, description="a number of seeds (0, 1, ...) or the seeds themselves")
    archs: list[str] | None = Field(None, description="model.arch of each cell; default: the recipe's")
    sweep: dict[str, list[Any]] = Field(default_factory=dict,
                                        description="recipe field -> values; every combination is a cell")
    method_sweep: dict[str, dict[str, list[Any]]] = Field(
        default_factory=dict, description="method -> its own sweep (added to `sweep` for that method's cells): "
                                          "a tuning study gives each method its own settings to try")
    downstream: list[str] = Field(min_length=1, description="evaluation sets")
    evaluate: EvaluateAt = EvaluateAt()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: use {', '.join(METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("seeds must be at least 1")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("seeds must be a non-empty list without repeats")
        return v

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_sweep(v, "sweep")

    @field_validator("method_sweep")
    @classmethod
    def _method_sweep(cls, v: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for method, sweep in v.items():
            _check_sweep(sweep, f"method_sweep.{method}")
        return v

    @model_validator(mode="after")
    def _method_settings_of_listed_methods(self) -> StudySpec:
        for name in ("method_overrides", "method_sweep"):
            extra = sorted(set(getattr(self, name)) - set(self.methods))
            if extra:
                raise ValueError(f"{name} names {extra}, which are not among the methods {self.methods}")
        for method, sweep in self.method_sweep.items():
            both = sorted(set(sweep) & set(self.sweep))
            if both:
                raise ValueError(f"method_sweep.{method} sweeps {both}, which sweep already sweeps for every method")
        return self

    def sweep_of(self, method: str) -> dict[str, list[Any]]:
        """The settings swept for one method's cells: `sweep`, then its `method_sweep`."""
        return {**self.sweep, **self.method_sweep.get(method, {})}

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


def _check_sweep(v: dict[str, list[Any]], where: str) -> dict[str, list[Any]]:
    for key, values in v.items():
        if "." not in key or not values:
            raise ValueError(f"{where} {key!r}: give section.field: [value, ...] with at least one value")
        if key in ("loss.method", "train.seed", "model.arch"):
            raise ValueError(f"{where} {key!r}: use methods, seeds or archs for it")
    return v


def shipped_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def load_study(study: str | Path | dict, overrides: list[str] | None = None) -> StudySpec:
    """A study spec from a path, a shipped name (cloob/studies/<name>.yaml) or a dict; `overrides`
    (`key=value`, YAML values: `seeds=2`, `methods=[cloob,clip]`) replace top-level fields."""
    import yaml

    from cloob.specfile import read_spec_file

    if isinstance(study, dict):
        data, origin = dict(study), "<dict>"
    else:
        data, path = read_spec_file(study, STUDIES_DIR, "study", "cloob/studies/demo.yaml")
        origin = str(path)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CloobError(f"study override {item!r} is not key=value", "write e.g. seeds=2")
        data[key.strip()] = yaml.safe_load(raw) if raw else None
    if isinstance(data, dict) and "name" in data:  # <store>/studies/<name>/: checked before anything runs
        check_name(data["name"], "study name")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "study"
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
        raise CloobError(f"invalid study {origin}: " + "; ".join(parts),
                         f"correct it; the fields: {', '.join(StudySpec.model_fields)} "
                         "(see cloob/studies/demo.yaml)") from None
