"""Spec files: the shipped data_specs/ folder, and reading a YAML spec by path or by a shipped name.
Shared by the pretraining specs (cloob.prepare.spec), the evaluation sets (cloob.evaluate.sets.spec)
and the studies (cloob.study.spec), none of which needs the others."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import yaml

from cloob.errors import CloobError


def _shipped_specs_dir() -> Path:
    """The shipped data_specs/: inside the package in an installed wheel (cloob/_data_specs, see
    pyproject.toml's force-include), else the checkout's top-level data_specs/ (a source tree or an
    editable install, whose package folder is the checkout's cloob/)."""
    packaged = importlib.resources.files("cloob").joinpath("_data_specs")
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "data_specs"


SPECS_DIR = _shipped_specs_dir()


def shipped_specs(specs_dir: Path = SPECS_DIR) -> list[str]:
    return sorted(p.stem for p in specs_dir.glob("*.yaml"))


def read_spec_file(name_or_path: str | Path, specs_dir: Path, what: str, example: str,
                   empty_ok: bool = False) -> tuple[dict, Path]:
    """(mapping, path) of a spec YAML given by path or by the name of one shipped in specs_dir.
    A missing file, bad YAML or a non-mapping raises CloobError naming `what` and a fix."""
    path = Path(name_or_path)
    if not path.is_file() and (specs_dir / f"{name_or_path}.yaml").is_file():
        path = specs_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        raise CloobError(f"{what} {str(name_or_path)!r} not found",
                         f"pass a YAML path or one of: {', '.join(shipped_specs(specs_dir))}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # a binary file, or text in another encoding
        raise CloobError(f"{what} {path} is not a text file: byte {e.start} is not UTF-8",
                         f"give a YAML {what} file (UTF-8 text); see {example} for the layout") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CloobError(f"{what} {path} is not valid YAML: {e}", "fix the YAML syntax") from None
    if data is None and empty_ok:
        data = {}
    if not isinstance(data, dict):
        raise CloobError(f"{what} {path} must be a mapping", f"see {example} for the layout")
    return data, path
