"""`cloob results`: its options, and the command that prints the report's tables and writes
results.md, results.png and the training curves beside them (`render_report`, `write_report`).

The report is built in arrange.py (paper.py: the published numbers) and formatted in render.py
(text, markdown) and figure.py (the PNG); training.py reads the runs' metrics.jsonl, curves.py draws
them.
"""

from __future__ import annotations

import argparse
import posixpath

from cloob.results.arrange import METRICS, Report, build_report
from cloob.results.curves import render_all
from cloob.results.figure import render_png
from cloob.results.render import render_markdown, render_text
from cloob.results.training import COMPARISON_PNG, DATA_FILE, gather, to_json
from cloob.storage import atomic_write_bytes


def render_report(report: Report) -> dict[str, bytes]:
    """The report's files, file name -> bytes, in memory: results.md, results.png and, for the runs
    whose metrics.jsonl is found beside their checkpoints, training.png, training-<run>.png and
    training.json (the points drawn). results.md links the pictures by these names."""
    training = gather(report)
    files = {"results.png": render_png(report), **render_all(training)}
    if training.runs:
        files[DATA_FILE] = to_json(training)
    files["results.md"] = render_markdown(report, "results.png", training).encode()
    return files


def write_report(report: Report, out_uri: str, files: dict[str, bytes] | None = None) -> dict[str, str]:
    """The report's files (render_report's, or files when given) under out_uri (a folder or URL), each
    written atomically, results.md last so that its links resolve once it is there. Returns the
    paths: markdown, png, and training_png and training_data when there are training curves."""
    base = out_uri.rstrip("/")
    files = render_report(report) if files is None else files
    for name, data in sorted(files.items(), key=lambda kv: kv[0] == "results.md"):
        atomic_write_bytes(posixpath.join(base, name), data)
    written = {"markdown": posixpath.join(base, "results.md"), "png": posixpath.join(base, "results.png")}
    if COMPARISON_PNG in files:
        written.update(training_png=posixpath.join(base, COMPARISON_PNG), training_data=posixpath.join(base, DATA_FILE))
    return written


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
    parser.add_argument("--out", help="where results.md, results.png and the training curves go "
                        "(default: <results>/report)")
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
    if "training_png" in written:
        print(f"wrote {written['training_png']} (and the runs' own training-<run>.png, {written['training_data']})")
    return 0
