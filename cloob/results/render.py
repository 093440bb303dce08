"""A Report as text: plain-text tables for the terminal and markdown (results.md), and that markdown
with its pictures embedded (`embed_images`, for the Prefect UI, which cannot follow a relative link)."""

from __future__ import annotations

import base64
import math
import re
import textwrap
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cloob.results.arrange import Report, Table
from cloob.results.paper import Ref

if TYPE_CHECKING:
    from cloob.results.training import Training


def _fmt(v, decimals: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{decimals}f}"
    return str(v)


def _numeric(col: list) -> bool:
    return all(v is None or v == "" or isinstance(v, (int, float, Ref)) for v in col)


def _text_table(t: Table) -> str:
    cells = [[_fmt(v, t.decimals) for v in row] for row in t.rows]
    out_cols = []
    for j, head in enumerate(t.columns):
        width = max([len(r[j]) for r in cells] + [8 if j else 1])
        # Long checkpoint labels as headers: wrapped over a few lines, not one very wide column.
        lines = textwrap.wrap(head, max(width, 14 if j else width, max(map(len, head.split()))),
                              break_on_hyphens=False) or [""]
        width = max([width] + [len(x) for x in lines])
        right = j > 0 and _numeric([row[j] for row in t.rows])
        out_cols.append((lines, width, right))
    n_head = max(len(c[0]) for c in out_cols)

    def line(parts):
        return "  ".join(parts).rstrip()

    text = []
    for i in range(n_head):
        parts = []
        for lines, width, right in out_cols:
            pad = [""] * (n_head - len(lines)) + lines  # headers sit on the rule
            parts.append(pad[i].rjust(width) if right else pad[i].ljust(width))
        text.append(line(parts))
    rule = line("-" * w for _, w, _ in out_cols)
    text.append(rule)
    for i, row in enumerate(cells):
        if t.summary_rows and i == len(cells) - t.summary_rows:
            text.append(rule)
        text.append(line(c.rjust(w) if right else c.ljust(w) for c, (_, w, right) in zip(row, out_cols)))
    return "\n".join(text)


def zero_shot_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """The zero-shot table as text cells: (header, rows)."""
    t = report.zeroshot
    return list(t.columns), [[_fmt(v, t.decimals) for v in row] for row in t.rows]


def render_text(report: Report) -> str:
    """Plain-text tables for the terminal."""
    out = [f"results: {report.results_uri}"]
    if report.zeroshot.rows:
        out += ["", report.zeroshot.title, _text_table(report.zeroshot)]
        out += [f"  * {n}" for n in report.notes]
    elif report.notes:
        out += [""] + [f"  * {n}" for n in report.notes]
    for t in (report.retrieval, report.diagnostics):
        if t.rows:
            out += ["", t.title, _text_table(t)]
    if report.diagnostics.rows:
        out.append(f"  * {_DIAG_NOTE}")
    return "\n".join(out) + "\n"


_DIAG_NOTE = ("eig: eigenvalues that hold 99% of the embeddings' covariance; alignment and uniformity "
              "(Wang & Isola): lower is better; ajne: about 0.25 for uniform directions, larger when crowded; "
              "on zero-shot sets the text side is the class embeddings")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(t: Table) -> str:
    head = "| " + " | ".join(_md_escape(c) for c in t.columns) + " |"
    align = "|" + "|".join("---:" if j and _numeric([r[j] for r in t.rows]) else ":---"
                           for j in range(len(t.columns))) + "|"
    body = []
    for i, row in enumerate(t.rows):
        cells = [_md_escape(_fmt(v, t.decimals)) for v in row]
        if t.summary_rows and i >= len(t.rows) - t.summary_rows:
            cells = [f"**{c}**" if c not in ("-", "") else c for c in cells]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, align, *body])


def _training_md(training: Training) -> list[str]:
    from cloob.results.training import COMPARISON_PNG, DATA_FILE

    out = ["", "## Training", ""]
    if training.runs:
        out += [f"![training curves, all runs: loss, lr, inv_tau, samples/s over step]({COMPARISON_PNG})", ""]
        if len(training.runs) > 1:  # with one run, training.png is that run's picture already
            for r in training.runs:
                out += [f"![training curves: {r.label}]({r.png})", ""]
        out.append(f"The points drawn: `{DATA_FILE}`.")
    if training.notes:
        out += ([""] if training.runs else []) + [f"{i}. {n}" for i, n in enumerate(training.notes, 1)]
    return out


def render_markdown(report: Report, png_name: str | None = "results.png", training: Training | None = None) -> str:
    """The report as markdown; png_name: the chart's relative link (None: no image); training: the
    training curves' section (cloob.results.training.gather), linking training.png and training-<run>.png."""
    out = ["# Results", "", f"Results table: `{report.results_uri}` (the latest row per run, checkpoint and dataset)."]
    if report.zeroshot.rows:
        out += ["", f"## {report.zeroshot.title}", ""]
        if png_name:
            out += [f"![{report.zeroshot.title}]({png_name})", ""]
        out.append(_md_table(report.zeroshot))
    if report.notes:
        out += [""] + [f"{i}. {n}" for i, n in enumerate(report.notes, 1)]
    if report.retrieval.rows:
        out += ["", f"## {report.retrieval.title}", "", _md_table(report.retrieval)]
    if report.diagnostics.rows:
        out += ["", f"## {report.diagnostics.title}", "", _md_table(report.diagnostics), "", _DIAG_NOTE + "."]
    out += ["", "**Checkpoints**", "", "| checkpoint | run | step | method | arch | pretraining | sha256 | weights |",
            "|:---|:---|---:|:---|:---|:---|:---|:---|"]
    for c in report.all_checkpoints:
        out.append("| " + " | ".join(_md_escape(_fmt(v, 0)) for v in (
            c.label, c.run_id, c.step, c.method, c.arch, c.pretraining_data, c.checkpoint_id[:12],
            c.checkpoint_uri)) + " |")
    if training is not None and (training.runs or training.notes):
        out += _training_md(training)
    return "\n".join(out) + "\n"


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def embed_images(markdown: str, images: Mapping[str, bytes]) -> str:
    """The markdown with every image link whose target is a key of images (`![...](results.png)`)
    replaced by a `data:image/png;base64,...` URI of those bytes, so that the pictures render where a
    relative link cannot be resolved: a Prefect markdown artifact. Other links are left as they are.

    images: link target -> PNG bytes; the files of cloob.results.report.render_report serve as they
    are: `embed_images(files["results.md"].decode(), files)`."""
    def embed(m: re.Match) -> str:
        data = images.get(m.group(2))
        if data is None:
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"

    return _IMAGE_LINK.sub(embed, markdown)
