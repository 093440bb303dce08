"""A Report as a figure: the grouped bar chart of results.png (matplotlib, imported only when drawn)."""

from __future__ import annotations

import io
from collections import Counter

from cloob.results.arrange import Report
from cloob.storage import atomic_write_bytes

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
