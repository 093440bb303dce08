"""A Report as a figure: the grouped bar chart of results.png (matplotlib, imported only when drawn).

`chart_data` is what the chart shows (bars, chance, the paper's markers, the panels); `render_png`
only draws it, so tests check the chart through the data rather than through pixels.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field

from cloob.methods import METHODS
from cloob.results.arrange import _METRIC_NAMES, Checkpoint, Report
from cloob.results.paper import Ref
from cloob.storage import atomic_write_bytes

CHANCE_LABEL = "chance (100 / classes)"


@dataclass
class PaperMarks:
    """One published column as markers: label (the legend's 'paper CLIP (...)'), method, a Ref per group."""

    label: str
    method: str
    values: list[Ref | None]


@dataclass
class Chart:
    """What results.png draws: one group per dataset (then the mean), one bar per checkpoint."""

    title: str
    ylabel: str
    groups: list[str]
    series: list[tuple[Checkpoint, list[float | None]]]
    papers: list[PaperMarks] = field(default_factory=list)
    chance: list[float | None] = field(default_factory=list)  # percent per group; None: not marked
    panels: list[list[int]] = field(default_factory=list)  # group indices per panel, each its own y range
    summary: int = 0  # trailing groups that summarise the others (the mean)
    ticks: list[str] = field(default_factory=list)  # the groups' labels on the x axis (default: groups)
    note: str = ""  # said under the title: why the paper's markers are missing


def _row_metrics(report: Report) -> list[list[str]]:
    zt = report.zeroshot
    return [(r[1] or "?").split("/") for r in zt.rows[:len(zt.rows) - zt.summary_rows]]


def metric_label(report: Report) -> str:
    """The zero-shot metric shown, in words: 'top-1 accuracy'; with --metric main and sets whose main
    metrics differ, 'main metric: top-1 accuracy / mean per-class recall'."""
    if report.metric != "main":
        return _METRIC_NAMES[report.metric]
    names = list(dict.fromkeys(n for ns in _row_metrics(report) for n in ns))
    if not names:  # retrieval only: no zero-shot metric to name
        return _METRIC_NAMES["main"]
    text = " / ".join(_METRIC_NAMES.get(n, n) for n in names)
    return text if len(names) == 1 else f"main metric: {text}"


def chart_data(report: Report) -> Chart:
    """The chart of a Report: the zero-shot table, or recall@1 when the table has only retrieval."""
    zt = report.zeroshot
    if not zt.rows:
        return _retrieval_chart(report)
    groups = [r[0] for r in zt.rows]
    series = [(c, [r[2 + i] for r in zt.rows]) for i, c in enumerate(report.checkpoints)]
    papers = [PaperMarks(report.paper.column(m), m, zt.column(report.paper.column(m)))
              for m in ("clip", "cloob") if report.paper and report.paper.column(m) in zt.columns]
    n_sets = len(groups) - zt.summary_rows
    chance = [report.chance.get(g) if i < n_sets else None for i, g in enumerate(groups)]
    # The paper's sets (often 5-30%) on their own y range, apart from sets near 100% (the demo's):
    # on one shared 0-100 axis the paper's markers and bars were squeezed against zero.
    published = [i for i in range(n_sets) if any(p.values[i] for p in papers)]
    others = [i for i in range(len(groups)) if i not in published]
    panels = [published, others] if published and any(i < n_sets for i in others) else [list(range(len(groups)))]
    metric = metric_label(report)
    ticks = list(groups)
    if metric.startswith("main metric:"):  # mixed metrics: each set says which is its own
        ticks[:n_sets] = [f"{g}\n({'/'.join(_METRIC_NAMES.get(n, n) for n in ns)})"
                          for g, ns in zip(groups, _row_metrics(report))]
    note = (f"the paper ({report.paper.label}) has no published numbers for these datasets"
            if report.paper and not published else "")
    return Chart(f"Zero-shot classification: {metric} (%)", f"{metric} (%)", groups, series, papers, chance,
                 panels, zt.summary_rows, ticks, note)


def _retrieval_chart(report: Report) -> Chart:
    rt = report.retrieval
    by_ckpt = {c.label: c for c in report.all_checkpoints}
    ds = list(dict.fromkeys(r[0] for r in rt.rows))
    groups = [f"{d} {h}" for d in ds for h in ("i2t R@1", "t2i R@1")]
    labels = list(dict.fromkeys(r[1] for r in rt.rows))
    vals = {(r[0], r[1]): (r[2], r[5]) for r in rt.rows}
    series = [(by_ckpt[lab], [vals.get((d, lab), (None, None))[k] for d in ds for k in (0, 1)]) for lab in labels]
    return Chart("Retrieval: recall@1 (%)", "recall@1 (%)", groups, series, chance=[None] * len(groups),
                 panels=[list(range(len(groups)))])


def png_bytes(fig, **savefig) -> bytes:
    """The figure as a PNG at 120 dpi, in 256 colours: a chart has few, and the palette makes the file
    a third of the size, which counts where the report is embedded as base64 (the Prefect artifact)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, pil_kwargs={"compress_level": 1}, **savefig)  # compressed below
    out = io.BytesIO()
    Image.open(io.BytesIO(buf.getvalue())).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(
        out, format="PNG")
    return out.getvalue()


def method_colors(methods: list[str | None]) -> list:
    """A colour per item: one colour family per method (CLIP blues, CLOOB oranges), shades within it."""
    import matplotlib

    shades = Counter(methods)
    used: Counter = Counter()
    out = []
    for m in methods:
        cmap = matplotlib.colormaps[METHODS[m].colormap if m in METHODS else "Greys"]
        k, total = used[m], shades[m]
        used[m] += 1
        out.append(cmap(0.75 - 0.4 * (k / max(total - 1, 1)) if total > 1 else 0.65))
    return out


def _draw_panel(ax, chart: Chart, idx: list[int], colors: list) -> None:
    n = max(len(chart.series), 1)
    group_w, bar_w = 0.8, 0.8 / n
    annotate = len(idx) * n <= 48
    top = 1.0
    for i, ((c, vals), color) in enumerate(zip(chart.series, colors)):
        xs = [x - group_w / 2 + bar_w * (i + 0.5) for x in range(len(idx))]
        ys = [vals[g] or 0.0 for g in idx]
        bars = ax.bar(xs, ys, bar_w * 0.92, color=color, edgecolor="black", linewidth=0.4,
                      hatch="//" if c.step is None else None, label=c.label)  # external weights hatched
        top = max([top, *ys])
        if annotate:
            for b, g in zip(bars, idx):
                if vals[g] is not None:
                    ax.annotate(f"{vals[g]:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    for x, g in enumerate(idx):
        ch = chart.chance[g] if g < len(chart.chance) else None
        if ch is not None:
            ax.hlines(ch, x - group_w / 2, x + group_w / 2, colors="crimson", linestyles=":", linewidth=1.8,
                      label=CHANCE_LABEL)
    for k, p in enumerate(chart.papers):
        known = METHODS.get(p.method)
        marker, color = (known and known.paper_marker) or ("o", "black")
        dx = (k - (len(chart.papers) - 1) / 2) * 0.3
        for x, g in enumerate(idx):
            ref = p.values[g]
            if ref is None:
                continue
            top = max(top, ref.value + (ref.std or 0))
            ax.errorbar(x + dx, ref.value, yerr=ref.std, fmt=marker, color=color, markeredgecolor="black",
                        markersize=9 if marker == "*" else 6, capsize=3, linewidth=0.8, zorder=5, label=p.label)
            ax.annotate(f"{ref.value:.1f}", (x + dx, ref.value), xytext=(5, 3), textcoords="offset points",
                        fontsize=7, fontweight="bold", zorder=6)
    n_sets = len(chart.groups) - chart.summary
    if chart.summary and idx[-1] >= n_sets and idx[0] < n_sets:  # the mean set off from the datasets
        ax.axvline(idx.index(n_sets) - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(idx)), [(chart.ticks or chart.groups)[g] for g in idx], rotation=30 if len(idx) > 4 else 0,
                  ha="right" if len(idx) > 4 else "center")
    ax.set_xlim(-0.6, len(idx) - 0.4)
    ax.set_ylim(0, min(top * 1.12 + 1, 112))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def render_png(report: Report, path: str | None = None) -> bytes:
    """A grouped bar chart (one group per dataset, one bar per checkpoint, chance and the paper as
    markers); returns the PNG and writes it to path (any fsspec URL) when given."""
    # Lazily (a slow import), and the Agg canvas directly: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chart = chart_data(report)
    n = max(len(chart.series), 1)
    width = min(28.0, max(7.0, 1.5 + len(chart.groups) * (0.32 * n + 0.6) + 0.8 * (len(chart.panels) - 1)))
    fig = Figure(figsize=(width, 5.0))
    FigureCanvasAgg(fig)
    ratios = [max(len(p), 1) for p in chart.panels]
    axes = fig.subplots(1, len(chart.panels), gridspec_kw={"width_ratios": ratios}, squeeze=False)[0]
    colors = method_colors([c.method for c, _ in chart.series])
    for ax, idx in zip(axes, chart.panels):
        if idx:
            _draw_panel(ax, chart, idx, colors)
    if len(chart.panels) > 1:
        axes[0].set_title("the paper's datasets", fontsize=9)
        axes[1].set_title("other datasets", fontsize=9)
    elif chart.note:
        axes[0].set_title(chart.note, fontsize=8, style="italic")
    axes[0].set_ylabel(chart.ylabel)
    fig.suptitle(chart.title)
    if not chart.groups:
        axes[0].text(0.5, 0.5, "no results to chart", ha="center", va="center", transform=axes[0].transAxes)
    handles: dict = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)  # chance and the paper: one entry each
    if handles:
        # The bars, then chance, then the paper.
        order = sorted(handles, key=lambda lab: (lab == CHANCE_LABEL) + 2 * lab.startswith("paper "))
        fig.legend([handles[lab] for lab in order], order, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   fontsize=8, ncol=2 if len(order) > 3 else 1, frameon=False)
    data = png_bytes(fig, bbox_inches="tight")
    if path is not None:
        atomic_write_bytes(path, data)
    return data
