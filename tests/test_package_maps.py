"""The maps of the code stay true: every package's docstring (its `__init__.py`) names each of its
modules (`name.py`) and subpackages (`name/`), and names no module that is not there; README's
"Layout" names every module too. A module added without its line fails here, with the line to add."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _packages() -> list[Path]:
    """Every package of the code: cloob/, flows/ and their subpackages (folders with an __init__.py)."""
    roots = [REPO / "cloob", REPO / "flows"]
    found = [init.parent for root in roots for init in root.rglob("__init__.py")
             if "__pycache__" not in init.parts]
    return sorted(found)


def _modules(pkg: Path) -> list[str]:
    return sorted(p.name for p in pkg.glob("*.py") if p.name != "__init__.py")


def _subpackages(pkg: Path) -> list[str]:
    return sorted(p.parent.name for p in pkg.glob("*/__init__.py"))


def _docstring(pkg: Path) -> str:
    return ast.get_docstring(ast.parse((pkg / "__init__.py").read_text())) or ""


def _dotted(pkg: Path) -> str:
    return ".".join(pkg.relative_to(REPO).parts)


def _names_module(doc: str, pkg: Path, module: str) -> bool:
    stem = module.removesuffix(".py")
    return (re.search(rf"(?<![\w.]){re.escape(module)}\b", doc) is not None
            or re.search(rf"\b{re.escape(_dotted(pkg))}\.{re.escape(stem)}\b", doc) is not None)


def _names_subpackage(doc: str, pkg: Path, sub: str) -> bool:
    return (re.search(rf"(?<![\w.]){re.escape(sub)}/", doc) is not None
            or re.search(rf"\b{re.escape(_dotted(pkg))}\.{re.escape(sub)}\b", doc) is not None)


def test_the_code_has_packages_to_check():
    names = {_dotted(p) for p in _packages()}
    assert {"cloob", "cloob.train", "cloob.run", "cloob.evaluate.sets", "flows"} <= names, names


@pytest.mark.parametrize("pkg", _packages(), ids=_dotted)
def test_package_docstring_names_every_module(pkg):
    doc = _docstring(pkg)
    missing = [m for m in _modules(pkg) if not _names_module(doc, pkg, m)]
    missing += [f"{s}/" for s in _subpackages(pkg) if not _names_subpackage(doc, pkg, s)]
    assert not missing, (f"{pkg.relative_to(REPO)}/__init__.py: its docstring (the package's map) does not "
                         f"name {', '.join(missing)}; add one line for each: `name.py   what it is for`")


@pytest.mark.parametrize("pkg", _packages(), ids=_dotted)
def test_package_docstring_names_no_missing_module(pkg):
    doc = _docstring(pkg)
    here = {p.name for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}
    named = set(re.findall(r"(?<![\w/.-])([A-Za-z_]\w*\.py)\b", doc))
    gone = sorted(named - here)
    assert not gone, (f"{pkg.relative_to(REPO)}/__init__.py: its docstring names {', '.join(gone)}, which is not "
                      f"a module of the package: drop or rename the line")


def _readme_layout() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Layout\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert m, "README.md has no '## Layout' section followed by another section"
    return m.group(1)


def test_readme_layout_names_every_package_and_module():
    layout = _readme_layout()
    missing = []
    for pkg in _packages():
        if pkg.parent != REPO and not re.search(rf"(?<![\w.]){re.escape(pkg.name)}/", layout):
            missing.append(f"{pkg.relative_to(REPO)}/")
        missing += [f"{pkg.relative_to(REPO)}/{m}" for m in _modules(pkg)
                    if not re.search(rf"(?<![\w.]){re.escape(m)}\b", layout)]
    assert not missing, f"README.md's Layout does not name {', '.join(missing)}"

