"""`cloob results`: the results table side by side, datasets x checkpoints, CLOOB next to CLIP, with
the paper's published numbers as reference columns; printed, and written as markdown and a PNG chart.
"""

from __future__ import annotations

import collections
import csv
import io
import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from cloob.errors import CloobError

PAPER_CSV = Path(__file__).parent / "paper_zero_shot.csv"
_METHOD_ORDER = {"clip": 0, "clip_hopfield": 1, "infoloob": 2, "cloob": 3}
_DIAG = [("image_effective_eigenvalues", "img eig"), ("text_effective_eigenvalues", "txt eig"),
         ("alignment", "align"), ("image_uniformity", "img unif"), ("text_uniformity", "txt unif"),
         ("image_ajne", "img ajne"), ("text_ajne", "txt ajne")]
_RETRIEVAL = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]


def load_paper(path: str | Path | None = None) -> list[dict]:
    with open(path or PAPER_CSV, newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class Column:
    run_id: str
    checkpoint_id: str
    method: str
    arch: str
    pretraining: str
    step: int | None

    @property
    def label(self) -> str:
        step = f" @{self.step}" if self.step is not None else ""
        run = self.run_id if len(self.run_id) <= 28 else "…" + self.run_id[-27:]
        return f"{self.method} {self.arch} {self.pretraining}{step} ({run})"


@dataclass
class Report:
    results_uri: str
    metric: str
    columns: list[Column]
    datasets: list[str]
    metric_names: dict[str, str]  # dataset -> the metric shown
    values: dict[tuple[str, int], float]  # (dataset, column index) -> fraction
    paper: tuple[str, str, str] | None  # (pretraining, encoder, epochs)
    paper_values: dict[str, dict[str, tuple[float, float | None]]] = field(default_factory=dict)
    retrieval: list[dict] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def paper_label(self, method: str) -> str:
        p, enc, ep = self.paper
        return f"paper {method.upper()} ({p} {enc}{f' {ep}ep' if ep else ''})"


def _base_arch(arch: str) -> str:
    return arch.removesuffix("-quickgelu")


def _choose_paper(spec: str, columns: list[Column], paper_rows: list[dict]) -> tuple[str, str, str] | None:
    if spec == "none":
        return None
    available = {(r["pretraining"], r["encoder"], r["epochs"]) for r in paper_rows}
    if spec != "auto":
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise CloobError(f"--paper {spec!r} is not PRETRAINING:ENCODER[:EPOCHS]",
                             "use e.g. --paper cc3m:RN50:128, --paper yfcc15m:RN101, auto or none")
        p, enc = parts[0], parts[1]
        ep = parts[2] if len(parts) == 3 else max((a[2] for a in available if a[:2] == (p, enc)), default="",
                                                  key=lambda e: int(e or 0))
        if (p, enc, ep) not in available:
            choices = ", ".join(sorted(":".join(x for x in a if x) for a in available))
            raise CloobError(f"the paper has no numbers for {spec}", f"choose one of: {choices}")
        return p, enc, ep
    counts = collections.Counter((c.pretraining, _base_arch(c.arch)) for c in columns)
    for (p, enc), _ in counts.most_common():
        eps = sorted((a[2] for a in available if a[:2] == (p, enc)), key=lambda e: int(e or 0))
        if eps:
            return p, enc, eps[-1]
    return "cc3m", "RN50", "128"


def build_report(results_uri: str, *, metric: str = "main", paper: str = "auto",
                 datasets: list[str] | None = None, runs: list[str] | None = None) -> Report:
    from cloob.results.table import read_rows

    rows = read_rows(results_uri, latest=True).to_pylist()
    if datasets:
        rows = [r for r in rows if r["dataset"] in datasets]
    if runs:
        rows = [r for r in rows if r["run_id"] in runs]
    if not rows:
        raise CloobError(f"no results in {results_uri}" + (" for the datasets/runs asked for" if datasets or runs else ""),
                         "run `cloob evaluate <run or checkpoint> --datasets ...` first (or check --results)")
    zs = [r for r in rows if r["task"] == "zeroshot"]
    cols: dict[tuple[str, str], Column] = {}
    for r in rows:
        cols.setdefault((r["run_id"], r["checkpoint_id"]), Column(
            r["run_id"], r["checkpoint_id"], r["method"] or "?", r["arch"] or "?", r["pretraining_data"] or "?",
            r["step"]))
    # Equal (pretraining, arch, step) side by side, CLIP before CLOOB.
    columns = sorted(cols.values(), key=lambda c: (c.pretraining, _base_arch(c.arch), c.step if c.step is not None
                                                   else -1, _METHOD_ORDER.get(c.method, 9), c.run_id))
    index = {(c.run_id, c.checkpoint_id): i for i, c in enumerate(columns)}
    ds_names = sorted({r["dataset"] for r in zs})
    metric_names, values, notes = {}, {}, []
    for r in zs:
        name = r["main_metric"] if metric == "main" else metric
        metric_names.setdefault(r["dataset"], name)
        v = r["main_value"] if metric == "main" else r.get(metric)
        if v is not None:
            values[(r["dataset"], index[(r["run_id"], r["checkpoint_id"])])] = v
    for r in rows:
        if r["n_skipped"]:
            notes.append(f"{r['dataset']}, {cols[(r['run_id'], r['checkpoint_id'])].label}: "
                         f"{r['n_skipped']} unreadable image(s) skipped of {r['n_images'] + r['n_skipped']}")
    paper_rows = load_paper()
    chosen = _choose_paper(paper, columns, paper_rows) if zs else None
    paper_values: dict[str, dict] = {}
    if chosen:
        for pr in paper_rows:
            if (pr["pretraining"], pr["encoder"], pr["epochs"]) == chosen:
                std = float(pr["std_percent"]) / 100 if pr["std_percent"] else None
                paper_values.setdefault(pr["dataset"], {})[pr["method"]] = (float(pr["top1_percent"]) / 100, std)
        if any(metric_names.get(d) not in (None, "top1") for d in ds_names if d in paper_values):
            notes.append("the paper's numbers are top-1 accuracy on every dataset; compare with --metric top1 "
                         "where the main metric differs")
    retrieval = [{"dataset": r["dataset"], "model": cols[(r["run_id"], r["checkpoint_id"])].label,
                  **{k: r[k] for k in _RETRIEVAL}, "n_images": r["n_images"]} for r in rows if r["task"] == "retrieval"]
    diags = [{"dataset": r["dataset"], "model": cols[(r["run_id"], r["checkpoint_id"])].label,
              **{k: r.get(k) for k, _ in _DIAG}} for r in rows
             if any(r.get(k) is not None for k, _ in _DIAG)]
    key = lambda d: (d["dataset"], d["model"])  # noqa: E731
    return Report(results_uri, metric, columns, ds_names, metric_names, values, chosen, paper_values,
                  sorted(retrieval, key=key), sorted(diags, key=key), notes)


# ------------------------------------------------------------------------------------------ tables

def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def zero_shot_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    header = ["dataset", "metric"] + [c.label for c in rep.columns]
    methods = ("clip", "cloob")
    if rep.paper:
        header += [rep.paper_label(m) for m in methods]
    body = []
    for d in rep.datasets:
        row = [d, rep.metric_names[d]] + [_pct(rep.values.get((d, i))) for i in range(len(rep.columns))]
        if rep.paper:
            for m in methods:
                v = rep.paper_values.get(d, {}).get(m)
                row.append("-" if v is None else _pct(v[0]) + (f" ±{100 * v[1]:.2f}" if v[1] is not None else ""))
        body.append(row)
    # The mean over the datasets every checkpoint has, so the columns are comparable.
    common = [d for d in rep.datasets if all((d, i) in rep.values for i in range(len(rep.columns)))]
    if len(common) > 1:
        row = [f"mean ({len(common)} sets)", ""] + [_pct(sum(rep.values[(d, i)] for d in common) / len(common))
                                                    for i in range(len(rep.columns))]
        if rep.paper:
            for m in methods:
                vals = [rep.paper_values.get(d, {}).get(m) for d in common]
                row.append("-" if any(v is None for v in vals) else _pct(sum(v[0] for v in vals) / len(vals)))
        body.append(row)
    return header, body


def _retrieval_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    header = ["dataset", "model", *_RETRIEVAL, "images"]
    return header, [[r["dataset"], r["model"], *[_pct(r[k]) for k in _RETRIEVAL], str(r["n_images"])]
                    for r in rep.retrieval]


def _diag_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    def fmt(v):
        return "-" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}")
    return (["dataset", "model", *[h for _, h in _DIAG]],
            [[r["dataset"], r["model"], *[fmt(r[k]) for k, _ in _DIAG]] for r in rep.diagnostics])


def _text(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in body]])


def _md(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(esc(c) for c in r) + " |" for r in body])


def _sections(rep: Report):
    if rep.datasets:
        yield "Zero-shot classification (percent)", zero_shot_table(rep)
    if rep.retrieval:
        yield "Retrieval recall@k (percent)", _retrieval_table(rep)
    if rep.diagnostics:
        yield ("Embedding diagnostics (effective eigenvalues: 99% of the covariance; alignment, uniformity: "
               "lower is more aligned / uniform; Ajne: ~0.25 uniform, higher less uniform)"), _diag_table(rep)


def render_text(rep: Report) -> str:
    parts = [f"{title}\n{_text(*table)}" for title, table in _sections(rep)]
    if rep.notes:
        parts.append("notes:\n" + "\n".join(f"  - {n}" for n in rep.notes))
    return "\n\n".join(parts) + "\n"


def render_markdown(rep: Report) -> str:
    parts = [f"# Results\n\nFrom `{rep.results_uri}`; the newest row per (run, checkpoint, dataset)."]
    parts += [f"## {title}\n\n{_md(*table)}" for title, table in _sections(rep)]
    if rep.paper:
        parts.append(f"Reference columns: the CLOOB paper's published zero-shot top-1 ({rep.paper[0]} pretraining, "
                     f"{rep.paper[1]}{f', {rep.paper[2]} epochs' if rep.paper[2] else ''}; "
                     "cloob/results/paper_zero_shot.csv).")
    if rep.notes:
        parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in rep.notes))
    return "\n\n".join(parts) + "\n"


def render_png(rep: Report) -> bytes:
    """A grouped bar chart: one group per dataset, one bar per checkpoint, paper bars hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(c.label, [rep.values.get((d, i)) for d in rep.datasets], {}) for i, c in enumerate(rep.columns)]
    if rep.paper:
        for m in ("clip", "cloob"):
            series.append((rep.paper_label(m), [rep.paper_values.get(d, {}).get(m, (None,))[0] for d in rep.datasets],
                           {"hatch": "//", "alpha": 0.6}))
    n = max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(rep.datasets) * (0.35 * n + 0.6)), 4.8))
    width = 0.8 / n
    for k, (label, vals, style) in enumerate(series):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(rep.datasets))]
        ax.bar(xs, [100 * v if v is not None else 0 for v in vals], width, label=label, **style)
    ax.set_xticks(range(len(rep.datasets)))
    ax.set_xticklabels([f"{d}\n({rep.metric_names[d]})" for d in rep.datasets], fontsize=8)
    ax.set_ylabel("percent")
    ax.set_title("Zero-shot classification")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_report(rep: Report, out_uri: str) -> dict[str, str]:
    from cloob.storage import atomic_write_bytes

    out = {"markdown": posixpath.join(out_uri, "results.md")}
    atomic_write_bytes(out["markdown"], render_markdown(rep).encode())
    if rep.datasets:
        out["png"] = posixpath.join(out_uri, "results.png")
        atomic_write_bytes(out["png"], render_png(rep))
    return out


def run_command(args) -> int:
    """`cloob results` (arguments defined in cloob/cli.py)."""
    from cloob.results.table import compact

    results = args.results or posixpath.join(args.store, "results")
    if args.compact:
        c = compact(results)
        print(f"compacted {c['parts_before']} part(s) into {c['part'] or 'nothing (fewer than 2 parts)'}")
    rep = build_report(results, metric=args.metric, paper=args.paper, datasets=args.dataset, runs=args.run)
    print(render_text(rep), end="")
    written = write_report(rep, args.out or posixpath.join(results, "report"))
    print("\nwritten: " + ", ".join(written.values()))
    return 0
