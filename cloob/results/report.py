"""`cloob results`: its options, and the command that prints the report's tables and writes
results.md and results.png (`write_report`).

The report is built in arrange.py (paper.py: the published numbers) and formatted in render.py
(text, markdown) and figure.py (the PNG).
"""

from __future__ import annotations

import argparse
import posixpath

from cloob.results.arrange import METRICS, Report, build_report
from cloob.results.figure import render_png
from cloob.results.render import render_markdown, render_text
from cloob.storage import atomic_write_bytes


def write_report(report: Report, out_uri: str) -> dict[str, str]:
    """results.md and results.png under out_uri (a folder or URL), each written atomically."""
    base = out_uri.rstrip("/")
    md, png = posixpath.join(base, "results.md"), posixpath.join(base, "results.png")
    png_bytes = render_png(report)
    atomic_write_bytes(png, png_bytes)
    atomic_write_bytes(md, render_markdown(report, "results.png").encode())
    return {"markdown": md, "png": png}


# ------------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cloob results`."""
    parser.add_argument("--store", default=".", help="root holding results/ (default: .)")
    parser.add_argument("--results", help="results table location (default: <store>/results)")
    parser.add_argument("--metric", default="main", choices=list(METRICS),
                        help="zero-shot metric shown (main: each dataset's main metric)")
    parser.add_argument("--paper", default="auto",
                        help="published reference columns: auto | none | PRETRAINING:ENCODER[:EPOCHS], "
                             "e.g. cc3m:RN50:128")
    parser.add_argument("--dataset", nargs="+", help="only these datasets (shell patterns allowed)")
    parser.add_argument("--run", nargs="+", help="only these runs (run ids; shell patterns allowed)")
    parser.add_argument("--out", help="where results.md and results.png go (default: <results>/report)")
    parser.add_argument("--compact", action="store_true", help="fold the table's parts into one file first")


def run_command(args: argparse.Namespace) -> int:
    """`cloob results`: print the tables, write results.md and results.png. CloobError on no rows."""
    from cloob.results.table import compact

    results = getattr(args, "results", None) or posixpath.join(getattr(args, "store", None) or ".", "results")
    if getattr(args, "compact", False):
        info = compact(results)
        if info["part"] and info["parts_before"] > 1:
            print(f"compacted {info['parts_before']} parts ({info['rows']} rows) into {info['part']}")
        else:
            print(f"nothing to compact ({info['parts_before']} part{'s' if info['parts_before'] != 1 else ''})")
    report = build_report(results, metric=getattr(args, "metric", "main") or "main",
                          paper=getattr(args, "paper", "auto") or "auto",
                          datasets=getattr(args, "dataset", None), runs=getattr(args, "run", None))
    print(render_text(report))
    written = write_report(report, getattr(args, "out", None) or posixpath.join(results, "report"))
    print(f"wrote {written['markdown']}\nwrote {written['png']}")
    return 0
