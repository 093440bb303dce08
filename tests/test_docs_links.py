"""Every relative link of the documentation resolves: README.md, docs/*.md, the READMEs of flows/,
bench/ and data_specs/, and BENCHMARKS.md link to files that exist and to headings (`#anchor`, as
GitHub makes them) that exist in the file linked. Moving a section from one page to another without
moving its links fails here.
No file of the code refers to a design document that is not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PAGES = sorted({REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md"),
                *(p for p in (REPO / "flows/README.md", REPO / "bench/README.md", REPO / "data_specs/README.md")
                  if p.exists())})

_FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, `_`, `-` and
    spaces kept), spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text())
    text = _CODE.sub(lambda m: m.group(0) if "](" not in m.group(0) else "", text)
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, mailto:, ...


def test_slug_is_githubs():
    assert slug("Studies (seeds, the ablation, significance)") == "studies-seeds-the-ablation-significance"
    assert slug("What `cloob train` does when something goes wrong") == "what-cloob-train-does-when-something-goes-wrong"
    assert slug("The demo's settings, and why") == "the-demos-settings-and-why"
    assert slug("Losses: the paper's 2×2 ablation") == "losses-the-papers-22-ablation"


def test_the_pages_are_found_and_hold_links():
    names = {p.relative_to(REPO).as_posix() for p in PAGES}
    assert {"README.md", "docs/training.md", "flows/README.md"} <= names, names
    assert len(links(REPO / "README.md")) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading with the anchor #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: " + "; ".join(broken)


def test_no_reference_to_a_design_document_that_is_not_in_the_repository():
    name = "DESIGN" + ".md"
    hits = [f"{p.relative_to(REPO)}:{i}" for d in ("cloob", "flows", "tests", "bench") for p in (REPO / d).rglob("*")
            if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".sh", ""} and "__pycache__" not in p.parts
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if name in line]
    assert not hits, f"{name} is not in the repository; cite the in-repo doc that holds the fact: {hits}"
