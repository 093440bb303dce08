"""Writing one benchmark's section of BENCHMARKS.md, leaving every other section as it is."""

from __future__ import annotations

import os
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(heading: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the block from `heading` up to the next '## ' heading or EOF, atomically."""
    content = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = content.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    block = text.rstrip("\n") + "\n"
    if start is None:
        new = content.rstrip("\n") + "\n\n" + block
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + block + ("\n" + tail if tail else "")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)
