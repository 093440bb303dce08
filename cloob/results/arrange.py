"""The report's data: the latest row per (run, checkpoint, dataset) of the results table, chosen and
arranged for reading (datasets x checkpoints, CLOOB next to CLIP, the paper's numbers as reference
columns, retrieval and diagnostics tables, footnotes).

`build_report` does the choosing and arranging; render.py and figure.py only format a Report.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace

from cloob import methods
from cloob.errors import CloobError
from cloob.names import shorten
from cloob.results.paper import PaperReference, Ref, choose_paper, load_paper, matched_settings, paper_values

METRICS = ("main", "top1", "top5", "mean_per_class_recall")
_METRIC_NAMES = {"top1": "top-1 accuracy", "top5": "top-5 accuracy",
                 "mean_per_class_recall": "mean per-class recall", "main": "main metric"}
_RETRIEVAL = [("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"), ("i2t_r10", "i2t R@10"),
              ("t2i_r1", "t2i R@1"), ("t2i_r5", "t2i R@5"), ("t2i_r10", "t2i R@10")]
_DIAGNOSTICS = [("image_effective_eigenvalues", "img eig"), ("text_effective_eigenvalues", "txt eig"),
                ("alignment", "alignment"), ("image_uniformity", "img unif"), ("text_uniformity", "txt unif"),
                ("image_ajne", "img ajne"), ("text_ajne", "txt ajne")]


# ----------------------------------------------------------------------------------- data types

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
    chance: dict[str, float] = field(default_factory=dict)  # zero-shot dataset -> percent (100 / classes)


# ------------------------------------------------------------------------------------ arranging

def _label(c: Checkpoint) -> str:
    parts = [c.method or "?", c.arch or "?"]
    if c.pretraining_data:
        parts.append(c.pretraining_data)
    if c.step is not None:
        parts.append(f"step {c.step}")
    name = c.run_id
    if name.startswith("open_clip:"):
        name = name.split(":", 2)[-1]  # open_clip:<arch>:<weights file>: the file says enough
    return " ".join(parts) + f" ({shorten(name, 28)})"


def _family(run_id: str) -> str:
    # "cloob-rn50-cc3m-seed1" and "clip-rn50-cc3m-seed1" are one family: sort them together. So are
    # "tiny-cloob-a293b34db1" and "tiny-clip-c6678aa8ef" (cloob train's <recipe>-<method>-<hash> run ids), so that
    # the method, not the hash, orders them.
    method_tokens = {t for name in methods.METHODS for t in re.split(r"[-_.:/ ]+", name)}
    tokens = [t for t in re.split(r"[-_.:/ ]+", run_id.lower())
              if t not in method_tokens and not re.fullmatch(r"[0-9a-f]{8,}", t)]
    return "-".join(tokens)


def _sort_key(c: Checkpoint):
    return ((c.pretraining_data or "~").lower(), (c.arch or "~").lower(), c.step is None, c.step or 0,
            _family(c.run_id), methods.order(c.method), c.method or "", c.run_id, c.checkpoint_id)


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


def _warning_notes(rows: list[dict], datasets: list[str]) -> list[str]:
    """Why a flagged set's numbers may not compare with the paper's: each distinct warning once."""
    notes = []
    for ds in datasets:
        for w in sorted({r["dataset_warnings"] for r in rows if r["dataset"] == ds and r.get("dataset_warnings")}):
            notes.append(f"{ds} (!): {w}")
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
    # auto: every other published setting that a shown checkpoint matches gets its columns too (imports
    # of the paper's YFCC RN50 and RN50x4 each beside their own numbers)
    others = [s for s in matched_settings(zs_ckpts, paper_rows) if s != ref] if ref and paper.lower() == "auto" else []
    # the published methods in display order (the paper's table has CLIP and CLOOB)
    paper_cols = [(ref.column(m), ref_values[m]) for m in methods.METHODS if m in ref_values]
    sources = [ref_source]
    for other in others:
        other_values, other_source = paper_values(other, paper_rows)
        paper_cols += [(other.column(m), other_values[m]) for m in methods.METHODS if m in other_values]
        sources.append(other_source)

    # zero-shot: rows = datasets, columns = checkpoints (+ the paper)
    cell = {(r["dataset"], (r["run_id"], r["checkpoint_id"])): r for r in zs}
    columns = ["dataset", "metric", *[c.label for c in zs_ckpts], *[name for name, _ in paper_cols],
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
        flagged = any(r and r.get("dataset_warnings") for r in rs)
        zt.rows.append([f"{ds} (!)" if flagged else ds, "/".join(names), *vals, *[v.get(ds) for _, v in paper_cols],
                        _count_cell([r and r.get("n_images") for r in rs]),
                        _count_cell([r and r.get("n_skipped") for r in rs])])
    # The mean over the datasets every checkpoint has, so that the columns are comparable.
    common = [ds for ds in zs_datasets if all(v is not None for v in values[ds])]
    notes = []
    if len(common) >= 2:
        means = [sum(values[ds][i] for ds in common) / len(common) for i in range(len(zs_ckpts))]
        paper_means = [Ref(sum(v[ds].value for ds in common) / len(common))
                       if all(ds in v for ds in common) else None for _, v in paper_cols]
        zt.rows.append(["mean", "", *means, *paper_means, "", ""])
        zt.summary_rows = 1
        if len(common) < len(zs_datasets):
            notes.append(f"mean: over the {len(common)} datasets every checkpoint has ({', '.join(common)})")
    if ref:
        care = ("; where the metric column is not top1 the numbers are not directly comparable (--metric top1)"
                if shown_metrics - {"top1"} else "")
        labels = " and ".join(s.label for s in (ref, *others))
        notes.append(f"paper columns: published zero-shot top-1 accuracy, {labels}, ± one standard deviation "
                     f"where given; the paper reports top-1 for all datasets{care}. "
                     f"Source: {'; '.join(dict.fromkeys(sources))}")
    notes += _skipped_notes(zs, zs_datasets, ckpts)
    notes += _warning_notes(zs, zs_datasets)

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
    classes = {ds: Counter(r["n_classes"] for r in zs if r["dataset"] == ds and r.get("n_classes")) for ds in zs_datasets}
    chance = {ds: 100.0 / n.most_common(1)[0][0] for ds, n in classes.items() if n}
    return Report(results_uri, metric, zs_ckpts, zs_datasets, zt, rtt, dt, ref, notes, list(ckpts.values()),
                  ref_values, ref_source, chance)
