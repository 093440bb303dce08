"""`cloob results`: the results table side by side, datasets x checkpoints, CLOOB next to CLIP, with
the paper's published zero-shot numbers as reference columns; as terminal text, markdown and a PNG.

`build_report` does the choosing and arranging; the `render_*` functions only format a Report.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import math
import posixpath
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from cloob.errors import CloobError
from cloob.storage import atomic_write_bytes

PAPER_CSV = Path(__file__).with_name("paper_zero_shot.csv")
METRICS = ("main", "top1", "top5", "mean_per_class_recall")
DEFAULT_PAPER = ("cc3m", "RN50", "128")
# clip before cloob: each CLOOB column lands right after the CLIP column it is compared with.
_METHOD_ORDER = {"clip": 0, "cloob": 1, "infoloob": 2, "clip_hopfield": 3}
_METRIC_NAMES = {"top1": "top-1 accuracy", "top5": "top-5 accuracy",
                 "mean_per_class_recall": "mean per-class recall", "main": "main metric"}
_RETRIEVAL = [("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"), ("i2t_r10", "i2t R@10"),
              ("t2i_r1", "t2i R@1"), ("t2i_r5", "t2i R@5"), ("t2i_r10", "t2i R@10")]
_DIAGNOSTICS = [("image_effective_eigenvalues", "img eig"), ("text_effective_eigenvalues", "txt eig"),
                ("alignment", "alignment"), ("image_uniformity", "img unif"), ("text_uniformity", "txt unif"),
                ("image_ajne", "img ajne"), ("text_ajne", "txt ajne")]


# ------------------------------------------------------------------------------------- data types

@dataclass(frozen=True)
class Checkpoint:
    """One evaluated model: a column of the zero-shot table."""

    run_id: str
    checkpoint_id: str
    method: str | None
    arch: str | None
    pretraining_data: str | None
    step: int | None
    checkpoint_uri: str | None
    label: str = ""


@dataclass(frozen=True)
class Ref:
    """A published number (percent) with its standard deviation where the paper gives one."""

    value: float
    std: float | None = None

    def __str__(self) -> str:
        return f"{self.value:.2f}" + (f" ±{self.std:.2f}" if self.std is not None else "")


class PaperReference(NamedTuple):
    """The chosen published setting; epochs is text as in the CSV ('' where the paper gives none)."""

    pretraining: str
    encoder: str
    epochs: str

    @property
    def label(self) -> str:
        return f"{self.pretraining} {self.encoder}" + (f" {self.epochs}ep" if self.epochs else "")

    def column(self, method: str) -> str:
        return f"paper {method.upper()} ({self.label})"


@dataclass
class Table:
    """Cells are str, int, float (formatted with `decimals`), Ref or None (shown as '-')."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    decimals: int = 2
    summary_rows: int = 0  # trailing rows (the mean) set off by a rule

    def column(self, name: str) -> list:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]

    def row(self, first: str) -> list:
        return next(r for r in self.rows if r[0] == first)


@dataclass
class Report:
    """What `cloob results` shows: the three tables, the paper reference and the footnotes."""

    results_uri: str
    metric: str
    checkpoints: list[Checkpoint]  # zero-shot columns, in display order
    datasets: list[str]  # zero-shot rows, in display order
    zeroshot: Table
    retrieval: Table
    diagnostics: Table
    paper: PaperReference | None  # the published setting in the reference columns
    notes: list[str]  # footnotes
    all_checkpoints: list[Checkpoint] = field(default_factory=list)  # zero-shot and retrieval
    paper_values: dict[str, dict[str, Ref]] = field(default_factory=dict)  # method -> dataset -> percent
    paper_source: str = ""


# ----------------------------------------------------------------------------------- the paper

def load_paper(path: str | Path | None = None) -> list[dict]:
    """The shipped published numbers, one dict per CSV row, as text: pretraining, encoder, method,
    epochs ('' for yfcc15m), dataset, top1_percent, std_percent ('' where not given), source."""
    with open(path or PAPER_CSV, newline="") as f:
        return list(csv.DictReader(f))


def _encoder(arch: str | None) -> str | None:
    # OpenAI-trained weights load as RN50-quickgelu: the same encoder as the paper's RN50.
    return re.sub(r"-quickgelu$", "", arch, flags=re.IGNORECASE) if arch else None


def _paper_choices(paper_rows: list[dict]) -> list[PaperReference]:
    return list(dict.fromkeys(PaperReference(r["pretraining"], r["encoder"], r["epochs"].strip())
                              for r in paper_rows))


def _choices_text(choices: list[PaperReference]) -> str:
    return ", ".join(":".join(x for x in c if x) for c in choices)


def _match(choices: list[PaperReference], pretraining: str, encoder: str,
           epochs: str | None = None) -> PaperReference | None:
    """The choice for (pretraining, encoder[, epochs]), case-insensitively; the longest training when
    epochs is not given (cc3m: 128 epochs)."""
    found = [c for c in choices if c.pretraining.lower() == pretraining.lower()
             and c.encoder.lower() == encoder.lower() and (epochs is None or c.epochs == epochs)]
    return max(found, key=lambda c: int(c.epochs or 0)) if found else None


def choose_paper(paper: str | None, checkpoints: list[Checkpoint],
                 paper_rows: list[dict] | None = None) -> PaperReference | None:
    """auto | none | PRETRAINING:ENCODER[:EPOCHS] -> the published setting shown (None for none).

    auto: the (pretraining data, encoder) most common among the checkpoints that the paper has
    numbers for, else cc3m RN50 128 epochs."""
    if paper is None or paper.lower() == "none":
        return None
    choices = _paper_choices(load_paper() if paper_rows is None else paper_rows)
    if paper.lower() == "auto":
        shown = Counter((c.pretraining_data, _encoder(c.arch)) for c in checkpoints
                        if c.pretraining_data and c.arch)
        for (pre, enc), _ in shown.most_common():  # ties: the first shown
            choice = _match(choices, pre, enc)
            if choice:
                return choice
        return _match(choices, *DEFAULT_PAPER)
    parts = paper.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and not parts[2].isdigit()):
        raise CloobError(f"--paper {paper!r} is not auto, none or PRETRAINING:ENCODER[:EPOCHS]",
                         f"use one of: auto, none, {_choices_text(choices)}")
    choice = _match(choices, parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    if choice is None:
        raise CloobError(f"the paper has no numbers for {paper!r}", f"use one of: auto, none, {_choices_text(choices)}")
    return choice


def paper_values(choice: PaperReference, paper_rows: list[dict] | None = None) -> tuple[dict[str, dict[str, Ref]], str]:
    """(method -> dataset -> Ref in percent, the source text) for a chosen setting."""
    values: dict[str, dict[str, Ref]] = {}
    sources = []
    for r in load_paper() if paper_rows is None else paper_rows:
        if PaperReference(r["pretraining"], r["encoder"], r["epochs"].strip()) == choice:
            std = r["std_percent"].strip()
            ref = Ref(float(r["top1_percent"]), float(std) if std else None)
            values.setdefault(r["method"], {})[r["dataset"]] = ref
            sources.append(r["source"])
    return values, "; ".join(dict.fromkeys(sources))


# ------------------------------------------------------------------------------------ arranging

def _shorten(s: str, width: int = 28) -> str:
    if len(s) <= width:
        return s
    head = (width - 1) // 2
    return s[:head] + "…" + s[-(width - 1 - head):]


def _label(c: Checkpoint) -> str:
    parts = [c.method or "?", c.arch or "?"]
    if c.pretraining_data:
        parts.append(c.pretraining_data)
    if c.step is not None:
        parts.append(f"step {c.step}")
    name = c.run_id
    if name.startswith("open_clip:"):
        name = name.split(":", 2)[-1]  # open_clip:<arch>:<weights file>: the file says enough
    return " ".join(parts) + f" ({_shorten(name)})"


def _family(run_id: str) -> str:
    # "cloob-rn50-cc3m-seed1" and "clip-rn50-cc3m-seed1" are one family: sort them together. So are
    # "tiny-a293b34db1" and "tiny-c6678aa8ef" (cloob train's <recipe>-<config hash> run ids), so that
    # the method, not the hash, orders them.
    tokens = [t for t in re.split(r"[-_.:/ ]+", run_id.lower())
              if t not in {"clip", "cloob", "infoloob", "hopfield"} and not re.fullmatch(r"[0-9a-f]{8,}", t)]
    return "-".join(tokens)


def _sort_key(c: Checkpoint):
    return ((c.pretraining_data or "~").lower(), (c.arch or "~").lower(), c.step is None, c.step or 0,
            _family(c.run_id), _METHOD_ORDER.get(c.method or "", 9), c.method or "", c.run_id, c.checkpoint_id)


def _checkpoints(rows: list[dict]) -> dict[tuple[str, str], Checkpoint]:
    found: dict[tuple[str, str], Checkpoint] = {}
    for r in rows:
        k = (r["run_id"], r["checkpoint_id"])
        if k not in found:
            found[k] = Checkpoint(r["run_id"], r["checkpoint_id"], r.get("method"), r.get("arch"),
                                  r.get("pretraining_data"), r.get("step"), r.get("checkpoint_uri"))
    ordered = sorted(found.values(), key=_sort_key)
    labels = [_label(c) for c in ordered]
    dup = {lab for lab, n in Counter(labels).items() if n > 1}
    out = {}
    for c, lab in zip(ordered, labels):
        # Same run and step, other weights (a rerun): the checkpoint hash tells them apart.
        lab = f"{lab} #{c.checkpoint_id[:8]}" if lab in dup else lab
        out[(c.run_id, c.checkpoint_id)] = replace(c, label=lab)
    return out


def _dataset_order(names, paper_rows: list[dict]) -> list[str]:
    known = list(dict.fromkeys(r["dataset"] for r in paper_rows))  # the paper's order first
    names = set(names)
    return [d for d in known if d in names] + sorted(names - set(known))


def _selected(value: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(value, p) for p in patterns)


def _count_cell(values: list[int | None]):
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else f"{vals[0]}–{vals[-1]}"


def _pct(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else 100.0 * v


def _skipped_notes(rows: list[dict], datasets: list[str], ckpts: dict) -> list[str]:
    notes = []
    for ds in datasets:
        per = sorted((ckpts[(r["run_id"], r["checkpoint_id"])].label, r.get("n_skipped") or 0)
                     for r in rows if r["dataset"] == ds)
        counts = {n for _, n in per}
        if counts == {0}:
            continue
        if len(counts) == 1:  # the same set read the same way by every checkpoint: say it once
            notes.append(f"{ds}: {counts.pop()} unreadable image(s) skipped")
        else:
            notes += [f"{ds}, {lab}: {n} unreadable image(s) skipped" for lab, n in per if n]
    return notes


def build_report(results_uri: str, *, metric: str = "main", paper: str | None = "auto",
                 datasets: list[str] | None = None, runs: list[str] | None = None) -> Report:
    """The latest row per (run, checkpoint, dataset) of the table, arranged for reading.

    datasets and runs filter by name (shell patterns allowed: 'cloob-*'); paper is auto, none or
    PRETRAINING:ENCODER[:EPOCHS] (see choose_paper)."""
    from cloob.results.table import read_rows

    if metric not in METRICS:
        raise CloobError(f"metric {metric!r} is not one of {', '.join(METRICS)}", "use --metric main")
    all_rows = read_rows(results_uri, latest=True).to_pylist()
    if not all_rows:
        raise CloobError(f"no results in {results_uri}", "run `cloob evaluate ...` first")
    rows = [r for r in all_rows if _selected(r["dataset"], datasets) and _selected(r["run_id"], runs)]
    if not rows:
        have_ds = ", ".join(sorted({r["dataset"] for r in all_rows}))
        have_runs = ", ".join(sorted({r["run_id"] for r in all_rows}))
        raise CloobError(f"no results in {results_uri} match the datasets {datasets or 'any'} and runs {runs or 'any'}",
                         f"the table has datasets: {have_ds}; runs: {have_runs}")
    paper_rows = load_paper()
    ckpts = _checkpoints(rows)
    zs = [r for r in rows if r["task"] == "zeroshot"]
    rt = [r for r in rows if r["task"] == "retrieval"]
    zs_keys = {(r["run_id"], r["checkpoint_id"]) for r in zs}
    zs_ckpts = [c for k, c in ckpts.items() if k in zs_keys]
    zs_datasets = _dataset_order({r["dataset"] for r in zs}, paper_rows)
    ref = choose_paper(paper, zs_ckpts, paper_rows) if zs else None
    ref_values, ref_source = paper_values(ref, paper_rows) if ref else ({}, "")

    # zero-shot: rows = datasets, columns = checkpoints (+ the paper)
    cell = {(r["dataset"], (r["run_id"], r["checkpoint_id"])): r for r in zs}
    paper_methods = [m for m in ("clip", "cloob") if m in ref_values]
    columns = ["dataset", "metric", *[c.label for c in zs_ckpts], *[ref.column(m) for m in paper_methods],
               "images", "skipped"]
    zt = Table(f"Zero-shot classification: {_METRIC_NAMES[metric]} (%)", columns)
    values: dict[str, list[float | None]] = {}
    shown_metrics = set()
    for ds in zs_datasets:
        rs = [cell.get((ds, (c.run_id, c.checkpoint_id))) for c in zs_ckpts]
        vals = [None if r is None else _pct(r["main_value"] if metric == "main" else r.get(metric)) for r in rs]
        values[ds] = vals
        names = sorted({r["main_metric"] or "?" for r in rs if r}) if metric == "main" else [metric]
        shown_metrics.update(names)
        zt.rows.append([ds, "/".join(names), *vals, *[ref_values[m].get(ds) for m in paper_methods],
                        _count_cell([r and r.get("n_images") for r in rs]),
                        _count_cell([r and r.get("n_skipped") for r in rs])])
    # The mean over the datasets every checkpoint has, so that the columns are comparable.
    common = [ds for ds in zs_datasets if all(v is not None for v in values[ds])]
    notes = []
    if len(common) >= 2:
        means = [sum(values[ds][i] for ds in common) / len(common) for i in range(len(zs_ckpts))]
        paper_means = [Ref(sum(ref_values[m][ds].value for ds in common) / len(common))
                       if all(ds in ref_values[m] for ds in common) else None for m in paper_methods]
        zt.rows.append(["mean", "", *means, *paper_means, "", ""])
        zt.summary_rows = 1
        if len(common) < len(zs_datasets):
            notes.append(f"mean: over the {len(common)} datasets every checkpoint has ({', '.join(common)})")
    if ref:
        care = ("; where the metric column is not top1 the numbers are not directly comparable (--metric top1)"
                if shown_metrics - {"top1"} else "")
        notes.append(f"paper columns: published zero-shot top-1 accuracy, {ref.label}, ± one standard deviation "
                     f"where given; the paper reports top-1 for all datasets{care}. Source: {ref_source}")
    notes += _skipped_notes(zs, zs_datasets, ckpts)

    # retrieval: one row per (dataset, checkpoint)
    order = {k: i for i, k in enumerate(ckpts)}
    rt_datasets = sorted({r["dataset"] for r in rt})
    rtt = Table("Retrieval: recall@k (%)", ["dataset", "checkpoint", *[h for _, h in _RETRIEVAL], "images", "skipped"])
    for r in sorted(rt, key=lambda r: (rt_datasets.index(r["dataset"]), order[(r["run_id"], r["checkpoint_id"])])):
        rtt.rows.append([r["dataset"], ckpts[(r["run_id"], r["checkpoint_id"])].label,
                         *[_pct(r.get(k)) for k, _ in _RETRIEVAL], r.get("n_images"), r.get("n_skipped")])
    notes += _skipped_notes(rt, rt_datasets, ckpts)

    # diagnostics: one row per (checkpoint, dataset) that has any
    ds_rank = {d: i for i, d in enumerate(zs_datasets + rt_datasets)}
    dt = Table("Embedding diagnostics", ["checkpoint", "dataset", *[h for _, h in _DIAGNOSTICS], "images", "skipped"],
               decimals=4)
    for r in sorted(rows, key=lambda r: (order[(r["run_id"], r["checkpoint_id"])], ds_rank.get(r["dataset"], 0))):
        if any(r.get(k) is not None for k, _ in _DIAGNOSTICS):
            dt.rows.append([ckpts[(r["run_id"], r["checkpoint_id"])].label, r["dataset"],
                            *[r.get(k) for k, _ in _DIAGNOSTICS], r.get("n_images"), r.get("n_skipped")])
    return Report(results_uri, metric, zs_ckpts, zs_datasets, zt, rtt, dt, ref, notes, list(ckpts.values()),
                  ref_values, ref_source)


# ------------------------------------------------------------------------------------ rendering

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


def render_markdown(report: Report, png_name: str | None = "results.png") -> str:
    """The report as markdown; png_name: the chart's relative link (None: no image)."""
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
    return "\n".join(out) + "\n"


_CMAPS = {"clip": "Blues", "cloob": "Oranges", "infoloob": "Greens", "clip_hopfield": "Purples"}


def _chart_data(report: Report):
    """(title, group names, [(checkpoint, values)], [(paper label, values, stds, line style)])."""
    zt = report.zeroshot
    if zt.rows:
        groups = [r[0] for r in zt.rows]
        series = [(c, [r[2 + i] for r in zt.rows]) for i, c in enumerate(report.checkpoints)]
        papers = []
        if report.paper:
            for m, style in (("clip", "--"), ("cloob", "-")):
                name = report.paper.column(m)
                if name in zt.columns:
                    refs = zt.column(name)
                    papers.append((name, [x.value if x else None for x in refs],
                                   [x.std if x else None for x in refs], style))
        return zt.title, groups, series, papers
    # Only retrieval in the table: chart recall@1 both ways.
    rt = report.retrieval
    by_ckpt = {c.label: c for c in report.all_checkpoints}
    ds = list(dict.fromkeys(r[0] for r in rt.rows))
    groups = [f"{d} {h}" for d in ds for h in ("i2t R@1", "t2i R@1")]
    labels = list(dict.fromkeys(r[1] for r in rt.rows))
    vals = {(r[0], r[1]): (r[2], r[5]) for r in rt.rows}
    series = [(by_ckpt[lab], [vals.get((d, lab), (None, None))[k] for d in ds for k in (0, 1)]) for lab in labels]
    return "Retrieval: recall@1 (%)", groups, series, []


def render_png(report: Report, path: str | None = None) -> bytes:
    """A grouped bar chart (one group per dataset, one bar per checkpoint, the paper as lines);
    returns the PNG and writes it to path (any fsspec URL) when given."""
    # Lazily (a slow import), and the Agg canvas directly: no pyplot, no global backend switch.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    title, groups, series, papers = _chart_data(report)
    n = max(len(series), 1)
    width = min(28.0, max(7.0, 1.5 + len(groups) * (0.32 * n + 0.6)))
    fig = Figure(figsize=(width, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    group_w = 0.8
    bar_w = group_w / n
    # One colour family per method (CLIP blues, CLOOB oranges), shades within it; external weights hatched.
    shades = Counter(c.method for c, _ in series)
    used: Counter = Counter()
    annotate = len(groups) * n <= 48
    for i, (c, vals) in enumerate(series):
        cmap = matplotlib.colormaps[_CMAPS.get(c.method or "", "Greys")]
        k, total = used[c.method], shades[c.method]
        used[c.method] += 1
        color = cmap(0.75 - 0.4 * (k / max(total - 1, 1)) if total > 1 else 0.65)
        xs = [g - group_w / 2 + bar_w * (i + 0.5) for g in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(xs, ys, bar_w * 0.92, color=color, edgecolor="black", linewidth=0.4,
                      hatch="//" if c.step is None else None, label=c.label)
        if annotate:
            for b, v in zip(bars, vals):
                if v is not None:
                    ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    for name, vals, stds, style in papers:
        first = True
        for g, (v, s) in enumerate(zip(vals, stds)):
            if v is None:
                continue
            ax.hlines(v, g - group_w / 2, g + group_w / 2, colors="black", linestyles=style, linewidth=1.6,
                      label=name if first else None)
            if s:
                ax.errorbar(g + (-0.05 if style == "--" else 0.05), v, yerr=s, color="black", capsize=3,
                            linewidth=0.8)
            first = False
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0,
                  ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if series or papers:
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("paper "))  # bars, then the paper
        ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
                  bbox_to_anchor=(0.5, -0.18 if len(groups) > 4 else -0.1), fontsize=8,
                  ncol=2 if len(series) + len(papers) > 3 else 1, frameon=False)
    if not groups:
        ax.text(0.5, 0.5, "no results to chart", ha="center", va="center", transform=ax.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data


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
