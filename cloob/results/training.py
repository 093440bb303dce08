"""The training curves' data: for each of a Report's runs, the series of its metrics.jsonl (loss, lr,
inv_tau, samples/s over step) and its zero-shot accuracy per evaluated step, read from the run
folder beside its checkpoints. curves.py draws them; `to_json` is the data drawn (training.json).

Nothing is drawn here (matplotlib is not imported): render.py links the pictures by name.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from dataclasses import dataclass, field

from cloob.results.arrange import Checkpoint, Report
from cloob.results.figure import metric_label
from cloob.storage import Location

SERIES = ("loss", "lr", "inv_tau", "samples_per_s")  # metrics.jsonl keys drawn, one panel each
COMPARISON_PNG = "training.png"
DATA_FILE = "training.json"


def png_name(run_id: str) -> str:
    """The file name of a run's own picture: training-<run_id>.png (odd characters as '_')."""
    return "training-" + re.sub(r"[^A-Za-z0-9._-]+", "_", run_id) + ".png"


@dataclass
class RunCurves:
    """One run's points: series key -> [(step, value)]; accuracy: dataset -> [(step, percent)]."""

    run_id: str
    method: str | None
    metrics_uri: str
    series: dict[str, list[tuple[int, float]]]
    accuracy: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method or '?'} {self.run_id}"

    @property
    def png(self) -> str:
        return png_name(self.run_id)


@dataclass
class Training:
    """The runs whose metrics.jsonl was found, the accuracy's metric name, and why others are missing."""

    metric: str
    runs: list[RunCurves]
    notes: list[str]


def parse_metrics(text: str) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl text -> key -> [(step, value)] for SERIES, sorted by step.

    A line cut by a crash is skipped; a step logged twice keeps its last line; non-finite values
    (a skipped non-finite step's loss) are left out, as a plot would leave them."""
    by_step: dict[str, dict[int, float]] = {k: {} for k in SERIES}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(step, int):
            continue
        for k in SERIES:
            v = rec.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_step[k][step] = float(v)
    return {k: sorted(pts.items()) for k, pts in by_step.items()}


def _accuracy(report: Report, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """dataset -> [(step, percent)] of the run's evaluated checkpoints, when it has several steps."""
    zt = report.zeroshot
    cols = [(2 + i, c.step) for i, c in enumerate(report.checkpoints) if c.run_id == run_id and c.step is not None]
    if len({s for _, s in cols}) < 2:
        return {}
    out = {}
    for row in zt.rows[:len(zt.rows) - zt.summary_rows]:
        pts = sorted((s, row[j]) for j, s in cols if row[j] is not None)
        if pts:
            out[row[0]] = pts
    return out


def gather(report: Report) -> Training:
    """The curves of the report's runs (external weights have none). A run folder without a readable
    metrics.jsonl is a note, not an error: the report is still written."""
    latest: dict[str, Checkpoint] = {}  # per run, its latest checkpoint that says where it was read
    for c in report.all_checkpoints:
        if c.step is None:  # external weights: no run folder
            continue
        best = latest.get(c.run_id)
        if best is None or (bool(c.checkpoint_uri), c.step) > (bool(best.checkpoint_uri), best.step):
            latest[c.run_id] = c
    runs, notes = [], []
    for run_id, c in latest.items():
        if not c.checkpoint_uri:
            notes.append(f"{run_id}: no training curves, the results table has no checkpoint_uri for it")
            continue
        # A checkpoint is <run folder>/checkpoints/step_N (cloob.evaluate.models reads the run the same way).
        uri = posixpath.join(posixpath.dirname(posixpath.dirname(c.checkpoint_uri.rstrip("/"))), "metrics.jsonl")
        try:
            text = Location(uri).read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            notes.append(f"{run_id}: no training curves, no metrics.jsonl at {uri}")
            continue
        except (OSError, ValueError, ImportError) as e:
            notes.append(f"{run_id}: no training curves, cannot read {uri} ({type(e).__name__}: {e})")
            continue
        runs.append(RunCurves(run_id, c.method, uri, parse_metrics(text), _accuracy(report, run_id)))
    return Training(metric_label(report), runs, notes)


def to_json(training: Training) -> bytes:
    """training.json: per run, per series, the (step, value) points drawn, and the pictures' names."""
    doc = {"metric": training.metric, "comparison_png": COMPARISON_PNG if training.runs else None,
           "runs": [{"run_id": r.run_id, "method": r.method, "label": r.label, "metrics_uri": r.metrics_uri,
                     "png": r.png, "series": {k: [list(p) for p in v] for k, v in r.series.items()},
                     "accuracy": {d: [list(p) for p in v] for d, v in r.accuracy.items()}} for r in training.runs],
           "notes": training.notes}
    return (json.dumps(doc, indent=1) + "\n").encode()
